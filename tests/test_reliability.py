"""Every failure explains itself, fast, and loses no data: the Ctrl-C race, corrupt initial weights, a cluster
too small, a torn metrics line, failures inside actors, a full disk, damaged checkpoints at resume, and the
smaller cases (unwritable output_dir, Ctrl-C message, policy.init's arch, Ray session directories)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.cli import main as cli_main
from cluster.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def tiny(out, *overrides):
    return load_config(TINY, [f"output_dir={out}", "learner.warmup_steps=0", "learner.lr=1e-3", *overrides])


def _last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    """Two complete learner checkpoints of the tiny model (no Ray): steps 1 and 2."""
    from learner import Learner
    from tests.updates import configs
    from benchmarks.tiny_models import random_showo, sample_groups
    from tests.updates import Planner
    root = tmp_path_factory.mktemp("ck") / "checkpoints"
    model = random_showo(seed=3)
    trajs, prompts = sample_groups(model, 2, 3, 4, seed=1)
    config = configs(transition="candidate2", lr=1e-3, warmup_steps=1)
    learner, planner = Learner(model, *config), Planner(config)
    rewards = [torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.2, 0.9, 0.4])]
    paths = []
    for _ in range(2):
        planner.train(learner, trajs, rewards, prompts)
        paths.append(learner.save_checkpoint(root))
    return root, paths


def _copy_root(saved, tmp_path) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(saved[0], root)
    return root


def _flip(path: Path, n: int = 64) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(n):
        blob[len(blob) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(blob))


def _weights(ck: Path) -> Path:
    return next(p for p in ck.iterdir() if p.name.endswith(".safetensors"))


# ---------------------------------------------------------------------------------------------- 1. the Ctrl-C race

@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_during_the_update_saves_a_consistent_checkpoint_and_resume_repeats_nothing(tmp_path, monkeypatch):
    """The interrupt is injected while the learner's update is in flight (the driver waits for it). The step
    completes, its metrics line is written, and the checkpoint's learner and driver agree; resume=auto then
    continues at the next step: max_steps updates in all, versions without a gap, one metrics line per step."""
    import ray
    from cluster.learner_group import LearnerGroup
    from cluster.errors import Interrupted
    from cluster.train import train
    real = LearnerGroup.get
    fired = []

    def interrupt_during_update(self, futures, what, timeout=None):
        if what == "the update" and self.version == 2 and not fired:     # the update of step 2
            fired.append(self.version)
            os.kill(os.getpid(), signal.SIGINT)          # Ctrl-C lands while the update runs
        return real(self, futures, what, timeout)

    monkeypatch.setattr(LearnerGroup, "get", interrupt_during_update)
    if ray.is_initialized():
        ray.shutdown()
    cfg = tiny(tmp_path, "max_steps=5", "eval.at_start=false")
    with pytest.raises(Interrupted) as e:
        train(cfg)
    assert fired == [2] and e.value.consistent and e.value.step == 3
    ck = Path(e.value.checkpoint)
    state = json.loads((ck / "trainer_state.json").read_text())
    assert ck.name == "step_000003" and state["step"] == 3
    assert state["driver_state"]["step"] == 3 and state["driver_state"]["version"] == 3
    monkeypatch.setattr(LearnerGroup, "get", real)
    summary = train(tiny(tmp_path, "max_steps=5", "eval.at_start=false", "resume=auto"))
    final = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert final["step"] == 5                                   # 5 updates for max_steps=5, none repeated
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4]
    assert [r["version"] for r in lines] == [1, 2, 3, 4, 5]
    # the timeline of steps 0-2 is kept beside the resumed run's; the config did not change, so no copy of it
    assert (tmp_path / "timeline.before_step_000003.json").is_file() and (tmp_path / "timeline.json").is_file()
    assert not list(tmp_path.glob("config.before_step_*"))
    # a finished run: resume=auto has nothing to do and says so without starting anything
    t0 = time.monotonic()
    again = train(tiny(tmp_path, "max_steps=5", "eval.at_start=false", "resume=auto"))
    assert again["nothing_to_do"] and time.monotonic() - t0 < 10
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    # a new run into it without resume would interleave two runs: refused before anything is written
    with pytest.raises(ConfigError, match="already holds a run .5 metric lines, checkpoints up to step_000005.*resume=auto"):
        train(tiny(tmp_path, "max_steps=2"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def test_interrupt_guard_defers_then_raises_and_a_second_ctrl_c_stops_at_once():
    from cluster.train import InterruptGuard
    guard, done = InterruptGuard(), []
    before = signal.getsignal(signal.SIGINT)     # default_int_handler, or SIG_IGN in a background shell job
    with pytest.raises(KeyboardInterrupt):
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            done.append("the step finished")              # still runs: the interrupt is deferred
    assert done == ["the step finished"]
    with pytest.raises(KeyboardInterrupt):
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)          # the second one is not deferred
            time.sleep(5)
            done.append("never")
    assert done == ["the step finished"]
    assert signal.getsignal(signal.SIGINT) is before
    # SIGTERM (what `ray job stop` sends) is deferred the same way, and the default handler comes back
    term_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            done.append("the step finished again")
    assert done[-1] == "the step finished again" and signal.getsignal(signal.SIGTERM) is term_before


def test_ctrl_c_ends_with_the_checkpoint_and_the_resume_command(monkeypatch, capsys, tmp_path):
    import cluster.train as train_mod
    from cluster.errors import Interrupted

    def stopped(cfg):
        raise Interrupted(7, str(tmp_path / "checkpoints" / "step_000007"))
    monkeypatch.setattr(train_mod, "train", stopped)
    assert cli_main(["train", "--config", TINY, f"output_dir={tmp_path}"]) == 130
    last = _last_line(capsys.readouterr().err)
    assert "interrupted at step 7" in last and "step_000007" in last
    assert f"maskgrpo train --config {TINY} output_dir={tmp_path} resume=auto" in last
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 2. corrupt init

def test_corrupt_initial_weights_fail_at_start_up(saved_checkpoints, tmp_path, capsys):
    copy = tmp_path / "init"
    shutil.copytree(saved_checkpoints[1][1], copy)
    _flip(_weights(copy))
    t0 = time.monotonic()
    assert cli_main(["train", "--config", TINY, f"policy.init={copy}", f"output_dir={tmp_path / 'run'}"]) == 1
    last = _last_line(capsys.readouterr().err)
    assert time.monotonic() - t0 < 30
    assert last.startswith("maskgrpo: StartupError: policy.init=") and "sha256" in last
    assert _weights(copy).name in last and not (tmp_path / "run" / "checkpoints").exists()


def test_policy_init_directory_sets_the_recorded_arch(saved_checkpoints, tmp_path):
    from cluster.config import section
    from cluster.preflight import verify_policy_init
    ck = saved_checkpoints[1][1]
    cfg = tiny(tmp_path, f"policy.init={ck}", "policy.arch.phi.num_hidden_layers=3")
    note = verify_policy_init(cfg)
    assert note and "2 layers" in note and cfg.policy.arch.phi.num_hidden_layers == 2
    assert section(cfg, "policy").arch.phi.hidden_size == 64
    assert verify_policy_init(cfg) is None                        # already what the directory holds


# ---------------------------------------------------------------------------------------------- 3. cluster too small

def test_resource_check_names_what_is_missing_and_the_overrides_that_fit():
    from cluster.preflight import StartupError, check_cluster_resources, resource_problems
    cfg = load_config(TINY)                                        # 1 rollout + 1 reward + 1 learner rank
    assert resource_problems(cfg, {"CPU": 3.0}, [0.0]) == []
    problems = resource_problems(cfg, {"CPU": 2.0}, [0.0])
    assert len(problems) == 1 and "3 CPUs needed" in problems[0] and "cluster.cpus_per_actor=0.5" in problems[0]
    default = load_config(REPO / "configs" / "default.yaml")      # the case: 3 actors on a 2-CPU head
    assert "3 CPUs needed" in resource_problems(default, {"CPU": 2.0}, [0.0])[0]
    other = load_config(TINY, ["eval.rewards=[{name: geneval, detector: {name: shapes}, strict: true}]"])
    assert "4 CPUs needed" in resource_problems(other, {"CPU": 2.0}, [0.0])[0]   # a second pool for evaluation
    one_gpu = load_config(REPO / "configs" / "one_gpu.yaml")
    assert any("GPUs needed" in p for p in resource_problems(one_gpu, {"CPU": 16.0}, []))
    assert resource_problems(one_gpu, {"CPU": 16.0, "GPU": 1.0}, [1.0]) == []
    calls = []

    def grows():                    # an autoscaler adds a node on the third look
        calls.append(1)
        return ({"CPU": 2.0 if len(calls) < 3 else 4.0}, [0.0])
    check_cluster_resources(cfg, wait_s=10, read=grows, poll_s=0.01)
    assert len(calls) == 3
    t0 = time.monotonic()
    with pytest.raises(StartupError, match="too small") as e:
        check_cluster_resources(cfg, wait_s=0.2, read=lambda: ({"CPU": 2.0}, [0.0]), poll_s=0.05)
    assert time.monotonic() - t0 < 2 and "cpus_per_actor=0.5" in str(e.value)


def _ray_start(tmp: Path, cpus: int) -> tuple[str, dict]:
    from learner.dist import free_port
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                    f"--num-cpus={cpus}", "--include-dashboard=false", f"--temp-dir={tmp}", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=120)
    return f"127.0.0.1:{port}", env


def _ray_stop(env) -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, env=env,
                   timeout=120)


@pytest.mark.integration
@pytest.mark.slow
def test_cluster_too_small_fails_fast_and_driver_exits_when_the_cluster_goes(tmp_path):
    import tempfile
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))            # Ray's socket paths must stay short
    cmd = [sys.executable, "-m", "cluster.train", "--config", TINY, f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    try:
        address, _ = _ray_start(temp, cpus=2)
        # with that head running on this machine, a local run (no address) still gets its own instance
        local = subprocess.run([sys.executable, "-c", "import ray; from cluster.config import load_config; "
                                "from cluster.ray_session import init_ray, shutdown_local_ray; "
                                f"print(init_ray(load_config({TINY!r}, [])), ray.get_runtime_context().gcs_address); "
                                "shutdown_local_ray()"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        mode, gcs = local.stdout.split()[-2:]
        assert mode == "local" and gcs.split(":")[-1] != address.split(":")[-1], local.stdout + local.stderr[-2000:]
        t0 = time.monotonic()
        p = subprocess.run(cmd + [f"cluster.address={address}", "cluster.resource_wait_s=3"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, p.stderr[-3000:]
        last = _last_line(p.stderr)
        assert time.monotonic() - t0 < 120
        assert "too small" in p.stderr and "3 CPUs needed" in p.stderr and "cluster.cpus_per_actor=0.5" in p.stderr
        assert last.startswith("maskgrpo: StartupError") or "cpus_per_actor" in last, last
        # the same run fits with the suggested override; stopping the head mid-run ends the driver
        driver = subprocess.Popen(cmd + [f"cluster.address={address}", "cluster.cpus_per_actor=0.5",
                                         "max_steps=100000", "cluster.cluster_lost_s=5"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = ""
        deadline = time.monotonic() + 240
        while "step 1 " not in out and time.monotonic() < deadline and driver.poll() is None:
            out += driver.stdout.readline()
        assert "step 1 " in out, out[-3000:]
        _ray_stop(env)
        try:
            rest = driver.communicate(timeout=180)[0]
        except subprocess.TimeoutExpired:
            driver.kill()
            pytest.fail("the driver kept running after its cluster was stopped")
        assert driver.returncode != 0, rest[-2000:]          # ended (by the watchdog or a failed call), not hung
    finally:
        _ray_stop(env)
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- 4. torn metrics line

def test_torn_last_metrics_line_is_dropped_and_a_damaged_middle_line_named(tmp_path, capsys):
    from cluster.metrics import MetricsFileError, MetricsLogger, read_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "reward_mean": 0.5}\n{"step": 1, "reward_mean": 0.6}\n{"step": 2, "rew')
    logger = MetricsLogger(tmp_path)
    logger.truncate_after(1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert f"{path}:3: the last line is incomplete" in capsys.readouterr().out
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    logger.truncate_after(1)                         # steps after the checkpoint: dropped, and said so
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert "2 lines of steps after the checkpoint (steps 2..3) dropped" in capsys.readouterr().out
    path.write_text('{"step": 0}\n{"step": 1, "rew\n{"step": 2}\n')
    with pytest.raises(MetricsFileError, match=rf"{path}:2: not a JSON record .* repair or delete that line"):
        logger.truncate_after(5)


# ---------------------------------------------------------------------------------------------- 5. failures in actors

@pytest.mark.integration
@pytest.mark.slow
def test_wrong_shape_initial_weights_end_with_the_loading_error(saved_checkpoints, tmp_path, capsys):
    """No manifest to check against (a release directory). A truncated file is caught before anything starts (its
    header); weights of the wrong shape only when an actor loads them, and the last line is that loading error,
    not 'a learner rank died'."""
    from safetensors.torch import load_file, save_file
    init = tmp_path / "release"
    shutil.copytree(saved_checkpoints[1][1], init, ignore=shutil.ignore_patterns("manifest.json", "engine", "*.pt"))
    weights = _weights(init)
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    t0 = time.monotonic()
    assert cli_main(["train", "--config", TINY, f"policy.init={init}", f"output_dir={tmp_path / 'early'}"]) == 1
    last = _last_line(capsys.readouterr().err)
    assert "cannot be read" in last and "truncated or damaged" in last and time.monotonic() - t0 < 15, last
    weights.write_bytes(intact)
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = state[name][:, :-1].contiguous()              # one column short: the header reads fine
    save_file(state, str(weights))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    p = subprocess.run([sys.executable, "-m", "cluster.train", "--config", TINY, f"policy.init={init}",
                        f"output_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=400)
    assert p.returncode == 1, p.stderr[-3000:]
    last = _last_line(p.stderr)
    assert last.startswith("maskgrpo: StartupError: ") and "could not start: CheckpointError" in last, last
    assert "died during" not in last


@pytest.mark.parametrize("override, expected", [("sampler.steps=0", "sampler.steps must be >= 1"),
                                                ("learner.transition=candidate3", "learner.transition")])
def test_values_that_failed_late_now_fail_at_load(override, expected):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY, [override])
    assert time.monotonic() - t0 < 5


def test_plain_text_prompts_with_the_geneval_reward_fail_at_load(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    with pytest.raises(ConfigError, match="needs GenEval metadata .* 2 of 2 have none"):
        load_config(TINY, [f"data.train_prompts={prompts}"])
    load_config(TINY, [f"data.train_prompts={prompts}", "rewards=[{name: 'tests.helpers.rewards:ConstantReward'}]",
                       "eval.rewards=[{name: geneval, detector: {name: shapes}}]"])


def test_root_cause_of_an_actor_error():
    from cluster.preflight import root_cause
    from ray.exceptions import ActorDiedError, RayTaskError
    from policy.weights import CheckpointError
    inner = CheckpointError("cannot read checkpoint file '/x/model.safetensors' (truncated)")
    task = RayTaskError("LearnerWorker.__init__", "Traceback ...\npolicy.weights.CheckpointError: cannot read "
                        "checkpoint file '/x/model.safetensors' (truncated)", inner)
    died = ActorDiedError(task)
    assert root_cause(died) == "CheckpointError: cannot read checkpoint file '/x/model.safetensors' (truncated)"
    assert root_cause(task) == root_cause(died)


# ---------------------------------------------------------------------------------------------- 6. full disk

def test_full_disk_is_named_and_leaves_no_debris(saved_checkpoints, tmp_path, monkeypatch):
    from learner import Learner
    from tests.updates import configs
    from benchmarks.tiny_models import random_showo
    from policy.files import DiskFullError, atomic_write_text
    from policy.weights import CheckpointError

    def full(tmp):
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError, match="is full .* free space or choose another output_dir"):
        from policy.files import atomic_write
        atomic_write(tmp_path / "config.yaml", full)
    assert list(tmp_path.iterdir()) == []                      # no config.yaml.tmp left behind
    atomic_write_text(tmp_path / "config.yaml", "ok")

    root = _copy_root(saved_checkpoints, tmp_path)
    learner = Learner(random_showo(seed=3), *configs(transition="candidate2"))
    learner.step = 7

    def short_write(*a, **k):            # what safetensors says when the disk fills under it
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr("learner.checkpoint.save_engine_state", short_write)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(CheckpointError, match="is full .* the previous checkpoints are untouched"):
        learner.save_checkpoint(root)
    assert sorted(p.name for p in root.iterdir()) == before       # no hidden .step_000007.tmp


# ---------------------------------------------------------------------------------------------- 7. resume=auto

def test_resume_auto_uses_the_newest_intact_checkpoint_and_says_why(saved_checkpoints, tmp_path):
    from learner.checkpoint import pick_resume_checkpoint
    root = _copy_root(saved_checkpoints, tmp_path)
    found, line = pick_resume_checkpoint(root)
    assert found == root / "step_000002" and "newest checkpoint, verified" in line
    _flip(_weights(root / "step_000002"))
    found, line = pick_resume_checkpoint(root)
    assert found == root / "step_000001"
    assert "step_000002 is damaged" in line and "sha256" in line and "kept as step_000002.damaged" in line
    assert (root / "step_000002.damaged").is_dir() and not (root / "step_000002").exists()
    (root / "step_000001" / "manifest.json").write_text("{not json")       # unreadable manifest: not silent
    found, line = pick_resume_checkpoint(root)
    assert found is None and "step_000001 is damaged" in line and "starting at step 0" in line
    assert (root / "step_000001.damaged").is_dir()


def test_explicit_resume_of_a_damaged_checkpoint_points_at_resume_auto(saved_checkpoints, tmp_path, capsys):
    root = _copy_root(saved_checkpoints, tmp_path)
    _flip(_weights(root / "step_000002"))
    assert cli_main(["train", "--config", TINY, f"output_dir={tmp_path}", f"resume={root / 'step_000002'}"]) == 1
    last = _last_line(capsys.readouterr().err)
    assert "sha256" in last and "resume=auto" in last


# ---------------------------------------------------------------------------------------------- 8. smaller cases

@pytest.mark.parametrize("where", ["file", "readonly", "proc"])
def test_unwritable_output_dir_is_a_config_error(tmp_path, capsys, where):
    if where == "file":
        target = tmp_path / "a_file"
        target.write_text("x")
    elif where == "readonly":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    else:
        target = Path("/proc/maskgrpo-run")
    assert cli_main(["train", "--config", TINY, f"output_dir={target}"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir='{target}'" in err and "choose a writable directory" in err and "Traceback" not in err


def test_resume_with_a_changed_config_names_the_keys_and_keeps_the_old_config(tmp_path, capsys):
    from cluster.config import save_resolved
    from cluster.train import keep_history
    save_resolved(tiny(tmp_path, "max_steps=5"), tmp_path)
    (tmp_path / "timeline.json").write_text("{}")
    keep_history(tiny(tmp_path, "max_steps=9", "learner.lr=5e-4", "data.group_size=8", "resume=auto"), 3)
    out = capsys.readouterr().out
    assert "changed config (2 keys" in out and "learner.lr: 0.001 -> 0.0005" in out and "data.group_size: 4 -> 8" in out
    assert "max_steps" not in out.split("keys")[1]                # max_steps and resume steer this call only
    kept = tmp_path / "config.before_step_000003.yaml"
    assert kept.is_file() and "lr: 0.001" in kept.read_text() and not (tmp_path / "config.yaml").exists()
    assert (tmp_path / "timeline.before_step_000003.json").is_file()
    (tmp_path / "timeline.json").write_text("{}")               # a second resume from the same step (the first
    keep_history(tiny(tmp_path, "max_steps=9"), 3)              # failed): its timeline is not piled up
    assert sorted(p.name for p in tmp_path.glob("timeline*")) == ["timeline.before_step_000003.json"]


def test_policy_init_file_that_holds_no_weights_fails_at_load(tmp_path, capsys):
    from safetensors.torch import save_file
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"not a checkpoint" * 100)
    assert cli_main(["train", "--config", TINY, f"output_dir={tmp_path / 'run'}", f"policy.init={junk}"]) == 2
    last = _last_line(capsys.readouterr().err)
    assert "is not a weights file" in last and "neither a safetensors file nor a torch.save archive" in last
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\xff" * 64)
    from cluster.preflight import unreadable_weights
    assert unreadable_weights(bad) is not None
    good = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2)}, str(good))
    assert unreadable_weights(good) is None


def test_eval_and_generate_bad_input_is_one_line(tmp_path, capsys):
    assert cli_main(["eval", "--config", TINY, "--checkpoint", str(tmp_path / "nope"), f"output_dir={tmp_path}"]) == 2
    assert "--checkpoint" in _last_line(capsys.readouterr().err)
    target = tmp_path / "a_file"
    target.write_text("x")
    assert cli_main(["generate", "--config", TINY, "--prompt", "a red circle", f"output_dir={target}"]) == 2
    assert "is a file" in _last_line(capsys.readouterr().err)
    assert cli_main(["generate", "--config", TINY, "--prompt", "a red circle", "--num-images", "0",
                     f"output_dir={tmp_path / 'g'}"]) == 2
    assert "--num-images 0" in _last_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_config_on_a_machine_without_gpus_fails_before_pretraining(tmp_path, capsys):
    t0 = time.monotonic()
    assert cli_main(["train", "--config", str(REPO / "configs" / "one_gpu.yaml"), f"output_dir={tmp_path / 'run'}",
                     f"pretrain.output={tmp_path / 'base'}"]) == 1
    err = capsys.readouterr().err
    assert "this machine cannot hold the run" in err and "use device=cpu" in _last_line(err)
    assert time.monotonic() - t0 < 15 and not (tmp_path / "base").exists()      # nothing pretrained, no wait


def test_relative_output_dir_in_a_ray_job_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("RAY_JOB_ID", "02000000")        # what the driver of a `ray job submit` sees
    assert cli_main(["train", "--config", TINY, "output_dir=runs/x"]) == 2
    last = _last_line(capsys.readouterr().err)
    assert "output_dir='runs/x' is relative" in last and "absolute path" in last


def test_local_ray_session_directory_is_removed():
    import tempfile
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")                 # Ray's socket paths must stay short
    code = ("import ray, pathlib; from cluster.ray_session import shutdown_local_ray; "
            f"ray.init(num_cpus=1, include_dashboard=False, _temp_dir='{temp}'); "
            "d = ray._private.worker._global_node.get_session_dir_path(); shutdown_local_ray(); "
            "print(d, pathlib.Path(d).exists())")
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        session, exists = (["", ""] + out.stdout.split())[-2:]
        assert session.startswith(temp) and exists == "False", (out.returncode, out.stdout[-500:], out.stderr[-2000:])
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_cluster_watchdog_exits_after_the_cluster_is_gone_and_stops_when_told():
    from cluster.runtime import watch_cluster
    lost, answers = [], iter([True, True])

    def ping():
        if next(answers, False) is False:
            raise ConnectionError("the head is gone")
    watch_cluster(0.3, poll_s=0.05, ping=ping, on_lost=lost.append)
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "unreachable" in lost[0] and "resume=auto" in lost[0]
    quiet: list[str] = []
    stop = watch_cluster(0.2, poll_s=0.05, ping=lambda: (_ for _ in ()).throw(ConnectionError()), on_lost=quiet.append)
    stop.set()                                    # e.g. this process shuts Ray down itself
    time.sleep(0.6)
    assert quiet == []
