"""`ray job stop` end to end: a real head node (`ray start --head --block`, loopback, with its dashboard for job
submission), a training job of the tiny config submitted with `RAY_JOB_STOP_WAIT_TIME_S` in its runtime env, and
`ray job stop` after a few steps. The driver must finish the step in flight, save a checkpoint at it and end
before the grace runs out; the job ends STOPPED, and the metrics and the checkpoint agree (nothing lost)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[1]


def _wait(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


@pytest.fixture()
def ray_head(tmp_path, monkeypatch):
    """A head node of its own (not `ray stop`, which would stop every Ray on the machine): `--block` keeps it in
    the foreground, and SIGTERM to it shuts down what it started. Loopback only, so without Ray's token auth (the
    job client here would need the head's token otherwise)."""
    port, dash, agent = free_port(), free_port(), free_port()   # (another Ray on the machine holds the defaults)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    from ray.job_submission import JobSubmissionClient
    url = f"http://127.0.0.1:{dash}"

    def client():
        try:
            return JobSubmissionClient(url)
        except Exception:
            assert head.poll() is None, "ray start --head exited"
            return None
    try:
        yield _wait("the head's job server", client, timeout=120, every=1.0)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.mark.integration
@pytest.mark.slow
def test_ray_job_stop_with_a_stop_wait_lets_the_driver_finish_the_step_and_save(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    from cluster.metrics import read_metrics
    out = tmp_path / "run"
    entry = (f"{sys.executable} -m cluster.train --config {REPO / 'configs' / 'tiny.yaml'} output_dir={out} "
             f"max_steps=100000 learner.total_steps=100000 save_every=0 eval.at_start=false "
             f"logging.progress=false")
    env = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}}

    def submitted():
        try:
            return ray_head.submit_job(entrypoint=entry, runtime_env=env)
        except RuntimeError as e:          # the head's job agent starts after its job server
            if "No available agent" in str(e):
                return None
            raise
    job = _wait("the job's submission", submitted, timeout=120, every=1.0)

    def three_steps():
        status = ray_head.get_job_status(job)
        assert status not in (JobStatus.FAILED, JobStatus.SUCCEEDED), ray_head.get_job_logs(job)[-3000:]
        return (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    _wait("three training steps", three_steps, timeout=300)
    t0 = time.monotonic()
    ray_head.stop_job(job)
    _wait("the job's end", lambda: ray_head.get_job_status(job) in (JobStatus.STOPPED, JobStatus.FAILED,
                                                                    JobStatus.SUCCEEDED), timeout=150)
    took = time.monotonic() - t0
    logs = ray_head.get_job_logs(job)
    assert ray_head.get_job_status(job) == JobStatus.STOPPED, logs[-3000:]
    assert took < 120, f"the driver was killed at the grace's end ({took:.0f} s), not stopped by itself"
    assert "SIGTERM (e.g. ray job stop)" in logs
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(len(steps)))
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert saved and saved[-1].name == f"step_{len(steps):06d}", (saved, steps)   # the last step is in it
    print(f"ray job stop -> the driver ended by itself after {took:.1f} s, checkpoint {saved[-1].name}")
