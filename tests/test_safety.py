"""Issue 19: a checkpoint never runs code, one run per output directory, metrics that match the weights on every
resume path, no silent ruin of the weights (a non-finite update stops the run before anything is saved), inputs
with bounds, and one clear line for every one of these."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from learner import Learner
from tests.helpers.learner import fixed_batch, model_with
from policy.files import sha256_file
from policy.weights import CheckpointError
from tests.updates import Planner, configs

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def data():
    return fixed_batch()


def _config(**kw):
    base = dict(transition="candidate1", lr=1e-3, warmup_steps=2, total_steps=10, micro_batch_rows=5, seed=11)
    base.update(kw)
    return configs(**base)


# ----- 1. a checkpoint is data ----------------------------------------------------------------------------------
class _Payload:
    """A pickle that, when unpickled with code execution possible, creates `marker` (what an attacker's file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rewrite_manifest(ck: Path) -> None:
    """What an attacker does after replacing a file: the manifest's sizes and hashes made to match again."""
    manifest = json.loads((ck / "manifest.json").read_text())
    for rel in manifest["files"]:
        f = ck / rel
        manifest["files"][rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    (ck / "manifest.json").write_text(json.dumps(manifest))


class Unpickling:
    """Records every unpickling a load could do (pickle.load/loads/Unpickler, torch.load) inside `with`."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.calls = monkeypatch, []

    def __enter__(self):
        calls = self.calls

        def spy(name, real):
            def wrapper(*a, **k):
                calls.append(name)
                return real(*a, **k)
            return wrapper

        class Spied(pickle.Unpickler):
            def __init__(self, *a, **k):
                calls.append("pickle.Unpickler")
                super().__init__(*a, **k)
        for name in ("load", "loads"):
            self.monkeypatch.setattr(pickle, name, spy(f"pickle.{name}", getattr(pickle, name)))
        self.monkeypatch.setattr(pickle, "Unpickler", Spied)
        self.monkeypatch.setattr(torch, "load", spy("torch.load", torch.load))
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()


@pytest.mark.parametrize("stage", [0, 2])
def test_a_checkpoint_whose_files_are_replaced_by_pickles_is_refused_and_runs_nothing(data, tmp_path, stage,
                                                                                      monkeypatch):
    _, trajs, rewards, prompts = data
    learner = Learner(model_with(data[0]), *_config(zero_stage=stage))
    Planner(learner.algorithm).train(learner, trajs, rewards, prompts)
    good = learner.save_checkpoint(tmp_path / "ck")
    files = sorted(json.loads((good / "manifest.json").read_text())["files"])
    assert "engine/rank000.safetensors" in files and "engine/rank000.json" in files
    assert "trainer_state.json" in files and "pytorch_model.safetensors" in files
    assert not [f for f in files if not f.endswith((".json", ".safetensors"))]      # nothing but data is written

    fresh = Learner(model_with(data[0]), *_config(zero_stage=stage))
    marker = tmp_path / "PWNED"
    for rel in files:                                  # every file a resume reads, one at a time
        ck = tmp_path / f"tampered_{rel.replace('/', '_')}" / good.name
        shutil.copytree(good, ck)
        (ck / rel).write_bytes(pickle.dumps(_Payload(marker)))
        _rewrite_manifest(ck)
        with Unpickling(monkeypatch) as spied, pytest.raises(CheckpointError) as e:
            fresh.resume(ck)
        assert spied.calls == [], rel                  # nothing was even handed to an unpickler
        line = str(e.value).splitlines()[-1]
        assert rel in line and "not data" in line and "refusing to load it" in line, line
        assert not marker.exists(), f"unpickling {rel} ran the payload"
    assert fresh.step == 0
    with Unpickling(monkeypatch) as spied:
        fresh.resume(good)                             # the untampered checkpoint still loads, as data
    assert fresh.step == 1 and spied.calls == []


def test_an_old_format_checkpoint_with_a_pickled_engine_state_is_not_resumed(data, tmp_path):
    from learner.checkpoint import pick_resume_checkpoint
    _, trajs, rewards, prompts = data
    learner = Learner(model_with(data[0]), *_config())
    Planner(learner.algorithm).train(learner, trajs, rewards, prompts)
    ck = learner.save_checkpoint(tmp_path / "checkpoints")
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["format"] = "maskgrpo-learner-checkpoint/1"
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="earlier version .* policy.init="):
        Learner(model_with(data[0]), *_config()).resume(ck)
    with pytest.raises(CheckpointError, match="earlier version"):
        pick_resume_checkpoint(tmp_path / "checkpoints")   # an old checkpoint is not "damaged": never renamed
    assert ck.is_dir()


def test_state_files_round_trip_and_refuse_what_is_not_data(tmp_path):
    import numpy as np
    from learner.state_files import read_state, write_state
    tree = {"state": {0: {"step": torch.tensor(3.0), "m": torch.arange(4.0)}}, "groups": [{"betas": (0.9, 0.95)}],
            "size": torch.Size([2, 3]), "inf": float("inf"), "np": np.arange(3, dtype=np.uint32), "none": None}
    write_state(tmp_path / "s", tree)
    back = read_state(tmp_path / "s")
    assert back["state"][0]["step"] == 3.0 and torch.equal(back["state"][0]["m"], torch.arange(4.0))
    assert back["groups"][0]["betas"] == (0.9, 0.95) and back["size"] == torch.Size([2, 3])
    assert back["inf"] == float("inf") and back["np"].dtype == np.uint32 and back["none"] is None
    with pytest.raises(TypeError, match="cannot store a .*_Payload as data"):
        write_state(tmp_path / "t", {"x": _Payload(tmp_path / "m")})


# ----- 2. one run per output directory ------------------------------------------------------------------------------
def _hold_lock(out: Path):
    """Another process holding the run lock of `out` (as a running `maskgrpo train` does)."""
    import subprocess
    import sys
    code = ("import sys, time; from cluster.preflight import prepare_output_dir; prepare_output_dir(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=Path(__file__).resolve().parents[1],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_into_an_output_dir_is_refused_at_once_naming_the_holder(tmp_path, capsys):
    import fcntl
    import socket
    import time
    from cluster.cli import main as cli_main
    from cluster.preflight import LOCK_NAME, StartupError, prepare_output_dir, release_output_dir
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(StartupError) as e:
            prepare_output_dir(out)
        assert time.monotonic() - t0 < 1.0                     # at once, no waiting
        message = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started " in message
        assert "in use by another run" in message and "another output_dir" in message
        tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
        for args in (["train", "--config", tiny, f"output_dir={out}", "resume=auto"],
                     ["eval", "--config", tiny, f"output_dir={out}"]):
            assert cli_main(args) == 1, args                   # train, resume=auto and eval all check it
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert last.startswith("maskgrpo: OutputDirInUse: output_dir=") and f"pid {holder.pid}" in last, last
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]   # the refused runs wrote nothing
    finally:
        holder.kill()                                          # kill -9: the OS releases the lock
        holder.wait()
    prepare_output_dir(out)                                    # so a killed run never blocks its own resume
    prepare_output_dir(out)                                    # the holder may take it again
    with open(out / LOCK_NAME) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)     # held: another open file cannot take it
    release_output_dir(out)
    with open(out / LOCK_NAME) as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)     # released


# ----- 3. metrics match the weights on every resume path ----------------------------------------------------------
def test_a_resume_that_finds_no_checkpoint_keeps_no_metric_line_of_the_earlier_attempt(tmp_path, capsys):
    from cluster.metrics import read_metrics, truncate_metrics
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "version": 1}) + "\n")   # step 0 of a stopped run
    assert truncate_metrics(out, -1, "of an attempt that saved no checkpoint") == [0]
    assert read_metrics(out) == []
    assert "1 lines of steps of an attempt that saved no checkpoint (steps 0..0) dropped" in capsys.readouterr().out


# ----- 4. no silent ruin of the weights -------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_an_lr_that_cannot_train_fails_at_load(value):
    from cluster.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="learner.lr must be a finite number > 0"):
        load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"), [f"learner.lr={value}"])


@pytest.mark.parametrize("stage", [0, 2])
def test_an_update_that_leaves_non_finite_weights_stops_before_anything_is_saved_or_synced(data, tmp_path, stage):
    from learner import NonFiniteUpdateError, latest_checkpoint
    _, trajs, rewards, prompts = data
    learner = Learner(model_with(data[0]), *_config(zero_stage=stage, grad_clip=0.0))
    planner = Planner(learner.algorithm)
    planner.train(learner, trajs, rewards, prompts)
    good = learner.save_checkpoint(tmp_path / "ck")
    for group in learner.engine.optimizer.param_groups:      # what learner.lr=inf did before the config refused it
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteUpdateError) as e:
        planner.train(learner, trajs, rewards, prompts)
    message = str(e.value)
    assert "learner update 2 (weight version 1 -> 2) left NaN/inf weights" in message
    assert str(good) in message and "Lower learner.lr" in message and learner.step == 1
    with pytest.raises(NonFiniteUpdateError, match="not saving a checkpoint"):
        learner.save_checkpoint(tmp_path / "ck")
    with pytest.raises(NonFiniteUpdateError, match="not syncing the weights"):
        learner.iter_weight_buckets()
    assert latest_checkpoint(tmp_path / "ck") == good         # the last checkpoint is the last good one


# ----- 5. inputs with bounds ----------------------------------------------------------------------------------------
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_a_group_size_the_machine_cannot_hold_fails_before_anything_starts():
    from cluster.config import load_config
    from cluster.preflight import StartupError, check_local_resources, memory_problems
    cfg = load_config(TINY, ["data.group_size=100000"])
    (problem,) = memory_problems(cfg, cpu_bytes=8 * 2**30, gpu_bytes=0)
    assert problem.startswith("data.group_size=100000 x data.prompts_per_step=2 rollouts need at least ")
    assert "this machine's free memory is 8.0 GiB: lower data.group_size or data.prompts_per_step" in problem
    assert memory_problems(load_config(TINY), cpu_bytes=8 * 2**30, gpu_bytes=0) == []
    gpu = load_config(TINY, ["data.group_size=100000", "device=auto", "cluster.rollout_gpus=0.5"])
    assert "a rollout worker's GPU share (cluster.rollout_gpus=0.5) is 1.0 GiB" in \
        memory_problems(gpu, cpu_bytes=1e15, gpu_bytes=2 * 2**30)[0]
    with pytest.raises(StartupError, match="data.group_size=100000"):
        check_local_resources(load_config(TINY, ["data.group_size=1000000"]))   # what this machine sees


def test_a_prompt_longer_than_the_text_area_is_named(tmp_path):
    from cluster.config import load_config
    from cluster.preflight import check_prompt_lengths
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n" + "a blue square " * 20_000 + "\nthe end\n")      # a 100 KB prompt
    note = check_prompt_lengths(load_config(TINY, [f"data.train_prompts={prompts}", "rewards=[{name: tests.helpers.rewards:PixelMeanReward}]"]))
    assert note.startswith("1 of 3 training prompts are longer than policy.arch.max_seq_length=16 tokens and are cut")
    assert "prompt 2, 'a blue square a blue square" in note and "has 60003 tokens" in note
    assert check_prompt_lengths(load_config(TINY)) is None


# ----- 6. prompt files that are not UTF-8 ----------------------------------------------------------------------------
def test_a_prompt_file_that_is_not_utf8_names_file_line_and_fix(tmp_path, capsys):
    from cluster.cli import main as cli_main
    from cluster.config import ConfigError, load_config
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("a red circle\nthe caf".encode() + b"\xff" + b" sign\n")
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"prompts.txt:2: not UTF-8 text \(byte 0xff at column 8\): save the file as UTF-8"):
        load_config(TINY, [f"data.train_prompts={bad}", "rewards=[{name: tests.helpers.rewards:PixelMeanReward}]"])
    for args in (["generate", "--config", TINY, f"output_dir={tmp_path / 'g'}", "--prompts", str(bad)],
                 ["eval", "--config", TINY, f"output_dir={tmp_path / 'e'}", "--prompts", str(jsonl)]):
        assert cli_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not UTF-8 text" in err[0] and "iconv" in err[0], err
    assert "eval.jsonl:2:" in err[0]


# ----- 7. the smaller points ---------------------------------------------------------------------------------------
def test_two_signals_while_the_main_thread_waits_in_c_stop_at_once():
    """Both arrive while the main thread is inside one long C call (as in ray.get): Python calls the handler once,
    the wakeup fd counts two, so the run stops at once instead of finishing the step."""
    import signal
    import threading
    import time
    from cluster.train import InterruptGuard

    def two_ctrl_c():
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)
    done = []
    before = signal.getsignal(signal.SIGINT)     # default_int_handler, or SIG_IGN in a background shell job
    # one C call of >= ~1.5 s, whatever the CPU: size the matmul from a timed small one (n^3 work)
    b = torch.randn(1000, 1000)
    t0 = time.monotonic()
    b @ b
    n = min(12000, int(1000 * (1.5 / max(time.monotonic() - t0, 1e-4)) ** (1 / 3)) + 1)
    a = torch.randn(n, n)
    with pytest.raises(KeyboardInterrupt):
        with InterruptGuard().deferred():
            threading.Thread(target=two_ctrl_c).start()
            t0 = time.monotonic()
            a @ a                                    # both signals land inside this one C call
            assert time.monotonic() - t0 > 0.6, "the C call was too short to hold both signals"
            time.sleep(2)
            done.append("the step finished")
    assert done == [] and signal.getsignal(signal.SIGINT) is before


def test_test_rewards_take_the_reward_actors_device_option():
    from rewards.worker import RewardWorker
    specs = [{"name": f"tests.helpers.rewards:{name}", **extra} for name, extra in
             (("ConstantReward", {}), ("PixelMeanReward", {"label": "px"}), ("NaNReward", {}),
              ("FailingReward", {}), ("FlakyReward", {"flag_file": "/nonexistent"}))]
    worker = RewardWorker(specs, decoder=None, device="cpu")      # built at once (it took 37 s to fail before)
    assert len(worker.labels()) == 5


def test_failed_resumes_do_not_pile_up_timelines(tmp_path):
    from cluster.config import load_config
    from cluster.train import keep_history
    cfg = load_config(TINY, [f"output_dir={tmp_path}"])
    (tmp_path / "timeline.json").write_text("the run up to step 2")
    keep_history(cfg, 2)
    for _ in range(3):                                   # three resumes from step 2 that failed
        (tmp_path / "timeline.json").write_text("a failed resume")
        keep_history(cfg, 2)
    assert sorted(p.name for p in tmp_path.glob("timeline*")) == ["timeline.before_step_000002.json"]
    assert (tmp_path / "timeline.before_step_000002.json").read_text() == "the run up to step 2"


def test_ray_unhandled_error_reports_go_to_the_error_log(tmp_path, caplog):
    import logging
    from cluster.errors import keep_remote_errors
    path = keep_remote_errors(tmp_path)
    worker_logger = logging.getLogger("ray._private.worker")
    with caplog.at_level(logging.ERROR, logger="ray._private.worker"):
        worker_logger.error("Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1'): "
                            "\x1b[36mray::RewardActor.score()\x1b[39m\nTraceback (most recent call last):\n  ...")
        worker_logger.error("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]       # not on the screen
    text = path.read_text()
    assert "ray::RewardActor.score()\nTraceback" in text and "\x1b" not in text


@pytest.mark.integration
def test_a_local_ray_instance_listens_on_loopback_only(tmp_path):
    import subprocess
    import sys
    code = ("import os, subprocess, psutil, ray; from cluster.config import load_config; "
            "from cluster.ray_session import init_ray, shutdown_local_ray; "
            f"assert init_ray(load_config({TINY!r}, ['cluster.local_num_cpus=1'])) == 'local'; "
            "pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}; "
            "out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout; "
            "print('\\n'.join(l.split()[3] for l in out.splitlines() if any(f'pid={p},' in l for p in pids))); "
            "shutdown_local_ray()")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    listening = out.stdout.split()
    assert listening, "no listening socket found"
    assert all("127.0.0.1" in a for a in listening), listening


def test_train_resume_auto_refuses_a_tampered_checkpoint_before_anything_starts(data, tmp_path, capsys):
    from cluster.cli import main as cli_main
    _, trajs, rewards, prompts = data
    learner = Learner(model_with(data[0]), *_config())
    Planner(learner.algorithm).train(learner, trajs, rewards, prompts)
    out = tmp_path / "run"
    ck = learner.save_checkpoint(out / "checkpoints")
    marker = tmp_path / "PWNED"
    (ck / "engine" / "rank000.json").write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(ck)
    assert cli_main(["train", "--config", TINY, f"output_dir={out}", "resume=auto"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("maskgrpo: StartupError: resume=auto: checkpoint ") and "'engine/rank000.json' is not data" in last
    assert "refusing to load it" in last and not marker.exists() and ck.is_dir()   # kept as it is, not "damaged"


def test_a_remote_traceback_in_a_failure_becomes_its_cause_on_one_line():
    from cluster.errors import one_line
    # the message of a NaN-reward run (configs/tiny.yaml, tests.helpers.rewards:NaNReward), colour codes and all
    message = ("reward tests.helpers.rewards:NaNReward failed twice (actor 0, then actor 0): RayTaskError(RewardError): "
               "\x1b[36mray::RewardWorker.score_groups()\x1b[39m (pid=26835, ip=127.0.0.1, actor_id=0e7f)\n"
               "  File \"/repo/rewards/worker.py\", line 127, in score_groups\n"
               "    out = self.rewards.score(images, [c.prompt for c in chunk], [c.meta for c in chunk])\n"
               "          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
               "  File \"/repo/rewards/base.py\", line 84, in check_scores\n"
               "    raise RewardError(label, f\"reward {label!r} returned {kind} as {what} for sample {i}\"\n"
               "rewards.base.RewardError: reward 'tests.helpers.rewards:NaNReward' returned NaN as score for sample 0 of "
               "the batch (1 non-finite of 8)")
    assert one_line(message) == ("reward tests.helpers.rewards:NaNReward failed twice (actor 0, then actor 0): RewardError: "
                                 "reward 'tests.helpers.rewards:NaNReward' returned NaN as score for sample 0 of the batch "
                                 "(1 non-finite of 8)")
    listing = "this machine cannot hold the run:\n  - 4 GPUs needed"
    assert one_line(listing) == listing                  # intentional lists of problems stay
