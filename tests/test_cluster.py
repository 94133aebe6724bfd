"""The distributed system on real Ray (CPU): rollout workers, reward actors and a DeepSpeed learner rank on the
tiny config — weight sync (collective and object store), trajectories by reference, a rollout worker killed
mid-step, the asynchronous mode, checkpoints / evaluation / resume, a dead learner, and `ray job submit`.

Every test but the `ray job submit` one shares one local Ray instance (module fixture) and most share one
Trainer; they run in file order (the last Trainer test kills the learner).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.config import load_config
from learner.dist import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
VENV_BIN = Path(sys.executable).parent       # the environment running the tests (e.g. .venv/bin)
PPS = 2                                        # tiny.yaml: data.prompts_per_step

pytestmark = pytest.mark.integration


def tiny_cfg(out, *overrides):
    return load_config(TINY, [f"output_dir={out}", "learner.warmup_steps=0", "learner.lr=1e-3",
                              "logging.progress=false", *overrides])


# ---------------------------------------------------------------------------------------------- weight-sync group

def test_weight_sync_group_sends_in_the_receivers_dtype():
    """The stand-alone gloo group (no Ray): the sender converts to the receivers' dtype (a bf16 copy here),
    both sides plan the same buckets, and every parameter arrives."""
    import threading

    import torch

    from actors.weight_sync import SyncGroupSpec, WeightSyncGroup, param_digest
    from learner.weights_export import iter_weight_buckets
    torch.manual_seed(0)
    sender = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    receiver = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    spec = SyncGroupSpec("test", "127.0.0.1", free_port(), 2, "gloo", 60.0)
    stats = {}

    def send():
        group = WeightSyncGroup(spec, 0)
        stats.update(group.send(iter_weight_buckets(sender, 4096, version=7, dtype=torch.bfloat16)))

    t = threading.Thread(target=send)
    t.start()
    version = WeightSyncGroup(spec, 1).receive(receiver, 4096, torch.bfloat16, 7)
    t.join(60)
    assert version == 7 and stats["bytes"] == sum(p.numel() * 2 for p in sender.parameters())
    assert param_digest(receiver) == param_digest(sender.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- ray job submit
# First in the file: it runs its own Ray head (loopback dashboard, token auth with a fresh token) before the
# module's local instance exists, and stops exactly the processes it started.

def _ray_bin(name: str = "ray") -> str:
    return str(VENV_BIN / name) if (VENV_BIN / name).exists() else shutil.which(name)


@pytest.mark.slow
def test_ray_job_submit_runs_training_on_a_real_head(tmp_path):
    if _ray_bin() is None:
        pytest.skip("no `ray` command")
    gcs_port, dash_port, client_port, agent_port = (free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")    # short: Ray's unix socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({
        # The job's entry point is `python ...`: the head's PATH must find the venv's python first (the job
        # supervisor inherits the head's environment); the code itself comes with --working-dir.
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        # Token authentication (on by default for new clusters): a fresh token for this head and its clients,
        # so neither ~/.ray/auth_token nor another cluster's token is touched.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
    })
    env.pop("PYTHONPATH", None)
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([_ray_bin(), "start", "--head", "--block", f"--port={gcs_port}",
                             f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1", "--num-cpus=4",
                             "--num-gpus=0", f"--ray-client-server-port={client_port}",
                             f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}",
                             "--disable-usage-stats"],
                            cwd=REPO, env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    out = tmp_path / "run"
    try:
        deadline = time.monotonic() + 180
        while True:                                # the dashboard answers (401 without the token is fine)
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(1)
        sub_id = f"maskgrpo-test-{secrets.token_hex(4)}"
        job = subprocess.run([_ray_bin(), "job", "submit", "--address", address, "--submission-id", sub_id,
                              "--working-dir", ".", "--", "python", "-m", "cluster.train", "--config",
                              "configs/tiny.yaml", "max_steps=2", f"output_dir={out}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
        logs = job.stdout + job.stderr
        (tmp_path / "job.log").write_text(logs)
        assert job.returncode == 0, logs[-5000:]
        assert f"Job '{sub_id}' succeeded" in logs, logs[-5000:]
        assert "[maskgrpo] step 0 reward" in logs and "[maskgrpo] step 1 reward" in logs, logs[-5000:]
        assert "evaluation at step 2" in logs
        status = subprocess.run([_ray_bin("python"), "-c", "import sys; from ray.job_submission import "
                                 "JobSubmissionClient as C; print(C(sys.argv[1]).get_job_status(sys.argv[2]))",
                                 address, sub_id], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr
        # the run wrote its outputs, and the uploaded working directory left the venv out (.gitignore)
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [0, 1]
        assert (out / "checkpoints" / "step_000002").is_dir() and (out / "eval" / "step_000002.json").is_file()
        pkgs = [p for p in Path(temp_dir).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
        assert pkgs and all((p / "cluster" / "train.py").is_file() and not (p / ".venv").exists() for p in pkgs)
    finally:
        head.send_signal(signal.SIGTERM)           # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)    # the session it was started in (start_new_session)
            head.wait(timeout=30)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- shared Ray + Trainer

@pytest.fixture(scope="module")
def trainer(local_ray, tmp_path_factory):
    """2 rollout workers, 1 reward actor, 1 learner rank, synchronous, collective weight sync."""
    from cluster.driver import Trainer
    tr = Trainer(tiny_cfg(tmp_path_factory.mktemp("trainer"), "cluster.num_rollout_workers=2", "max_steps=100"))
    tr.sync_weights()
    yield tr
    tr.shutdown()


def _digests(ray, tr):
    learner = ray.get(tr.learner.ranks[0].digest.remote())
    workers = ray.get([w.digest.remote() for w in tr.fleet.workers.values()])
    return learner, workers


def test_weights_reach_every_worker_collective_and_object_store(local_ray, trainer):
    ray, tr = local_ray, trainer
    learner, workers = _digests(ray, tr)
    assert learner[0] == 0 and workers == [learner] * 2          # same init everywhere
    for mode in ("collective", "object_store", "collective"):
        tr.cfg.cluster.weight_sync = mode
        before = learner
        rec = tr.train_step().to_json()
        learner, workers = _digests(ray, tr)
        assert learner[0] == before[0] + 1 == rec["version"] == tr.version      # the update advanced the version
        assert learner[1] != before[1]                                          # and changed the weights
        assert workers == [learner] * 2, mode                                   # every worker holds them
        assert rec["sync_collective"] == float(mode == "collective")
        assert rec["sync_bytes"] > 0
        statuses = tr.fleet.statuses()
        assert {s["version"] for s in statuses.values()} == {tr.version}
    tr.cfg.cluster.weight_sync = "collective"


def test_trajectories_travel_by_reference(local_ray, trainer, monkeypatch):
    """The driver hands trajectory references to reward actors and learner ranks and never fetches one."""
    ray, tr = local_ray, trainer
    from policy.trajectory import Trajectory
    real_get, fetched = ray.get, []

    def spy(refs, *args, **kwargs):
        out = real_get(refs, *args, **kwargs)
        fetched.extend(o for o in (out if isinstance(out, list) else [out]) if isinstance(o, Trajectory))
        return out

    monkeypatch.setattr(ray, "get", spy)
    rec = tr.train_step().to_json()
    monkeypatch.undo()
    assert not fetched, "the driver fetched trajectories"
    assert rec["groups"] == PPS and rec["learner/seconds_step"] >= 0 and rec["kept_groups"] + rec["dropped_groups"] == PPS
    for g in tr.last_groups:                       # they are in the object store, owned by the driver
        assert isinstance(g.trajectory, ray.ObjectRef)
        traj = ray.get(g.trajectory)
        assert isinstance(traj, Trajectory) and traj.final_codes.shape == (4, 16)
        assert traj.policy_version == g.meta.policy_version == rec["version"] - 1
        assert traj.meta["group_id"] == g.meta.group_id


def _run_steps(tr, n, ids):
    recs = []
    for _ in range(n):
        step = tr.step
        recs.append(tr.train_step().to_json())
        got = [g.meta.group_id for g in tr.last_groups]
        assert sorted(got) == [step * PPS + k for k in range(PPS)], (step, got)
        ids.extend(got)
    return recs


def test_killed_rollout_worker_loses_and_duplicates_no_group(local_ray, trainer):
    ray, tr = local_ray, trainer
    start_step, trained0, reissued0 = tr.step, tr.counters["groups_trained"], tr.counters["groups_reissued"]
    ids: list[int] = []
    victim = tr.fleet.workers[0]
    old_pid = ray.get(victim.ready.remote())["pid"]
    # Put the step's rollouts in flight with worker 0's queued behind a sleep, then kill worker 0.
    victim.__ray_call__.remote(lambda self: time.sleep(3))
    for s in tr._steps_to_launch():              # the step's dispatch and rewards stages
        tr.inflight[s] = tr.rollouts.dispatch(tr._requests(s))
        tr.rewards.score_rollouts(tr.inflight[s])
    assert {p.worker for p in tr.inflight[tr.step]} == {0, 1}
    ray.kill(victim, no_restart=False)           # rollout workers are not restarted: the fleet replaces them
    recs = _run_steps(tr, 1, ids)
    assert recs[0]["groups_reissued"] >= 1 and recs[0]["groups"] == PPS
    assert 0 not in tr.fleet.workers                                         # dropped, its groups re-issued
    t0 = time.monotonic()
    while len(tr.fleet.workers) < 2 and time.monotonic() - t0 < 300:         # the replacement joins
        recs += _run_steps(tr, 1, ids)
    newest = tr.fleet.workers[max(tr.fleet.workers)]
    assert len(tr.fleet.workers) == 2 and ray.get(newest.ready.remote())["pid"] != old_pid
    recs += _run_steps(tr, 1, ids)
    learner, workers = _digests(ray, tr)
    assert workers == [learner] * 2                                             # with the current weights
    assert recs[-1]["sync_collective"] == 1.0                                   # in a re-formed sync group
    # Another one dies: the run goes on with the one left (cluster.min_rollout_workers: 1) in the same step.
    ray.kill(tr.fleet.workers[min(tr.fleet.workers)], no_restart=True)
    recs += _run_steps(tr, 2, ids)
    assert len(tr.fleet.workers) >= 1
    steps = tr.step - start_step
    assert tr.counters["groups_trained"] - trained0 == steps * PPS == len(ids) == len(set(ids))
    assert all(r["kept_groups"] + r["dropped_groups"] == PPS for r in recs)                      # each group trained once
    assert tr.counters["groups_reissued"] > reissued0


def test_learner_failure_names_resume_auto(local_ray, trainer):
    from cluster.errors import LearnerFailure
    ray, tr = local_ray, trainer
    ray.kill(tr.learner.ranks[0])
    with pytest.raises(LearnerFailure, match="resume=auto"):
        tr.train_step()


# ---------------------------------------------------------------------------------------------- train(): async, resume

@pytest.mark.slow
def test_train_async_checkpoints_eval_then_resume(local_ray, tmp_path):
    from cluster.metrics import read_metrics
    from cluster.train import train
    out = tmp_path / "run"
    cfg = tiny_cfg(out, "cluster.num_rollout_workers=2", "cluster.max_staleness=1", "max_steps=3", "save_every=2")
    summary = train(cfg)
    assert local_ray.is_initialized()                              # train() leaves a Ray it did not start alone
    lines = read_metrics(out)
    assert [r["step"] for r in lines] == [0, 1, 2]
    for r in lines:
        for key in ("reward_mean", "reward_std", "loss", "version", "rollout_seconds", "reward_seconds",
                    "learner_seconds", "sync_seconds", "step_seconds", "staleness_mean", "staleness_max",
                    "staleness_hist", "groups_reissued", "groups_stale_dropped"):
            assert key in r, key
        assert r["version"] == r["step"] + 1 and r["groups"] == PPS
        assert r["staleness_max"] <= 1 and sum(r["staleness_hist"].values()) == PPS
    assert lines[0]["staleness_hist"] == {"0": PPS}                # step 0 was sampled with the initial weights
    assert any(r["staleness_hist"].get("1", 0) > 0 for r in lines)  # later ones one version behind
    assert summary["counters"]["groups_trained"] == 3 * PPS
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    for step in (0, 3):
        report = json.loads((out / "eval" / f"step_{step:06d}.json").read_text())
        assert report["step"] == step and 0.0 <= report["overall"] <= 1.0 and report["categories"]
    assert (out / "samples" / "step_000000.png").is_file() and (out / "config.yaml").is_file()

    # The run "crashed" after its step-2 checkpoint: resume=auto continues from there without duplicate lines.
    shutil.rmtree(out / "checkpoints" / "step_000003")
    summary = train(tiny_cfg(out, "cluster.num_rollout_workers=2", "cluster.max_staleness=1", "max_steps=5",
                             "resume=auto"))
    lines = read_metrics(out)
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4]
    assert [r["version"] for r in lines] == [1, 2, 3, 4, 5]      # the learner version continues
    assert "eval_start" not in summary and (out / "eval" / "step_000005.json").is_file()
    assert summary["checkpoint"].endswith("step_000005")
    assert summary["counters"]["groups_trained"] == 5 * PPS       # restored counters + the 3 new steps
