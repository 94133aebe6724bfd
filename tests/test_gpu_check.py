"""`python -m benchmarks.gpu_check --tiny` on the CPU: the one-command GPU check runs its every stage (sampler,
reward, DeepSpeed learner at ZeRO 2 and 0 with a KL reference, weight hand-over, the product's training step on
the local backend) and its assertions pass, in a process where Ray cannot be imported (the GPU machine has none)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Importing Ray raises ImportError in the child, as on a machine where it is not installed.
BLOCKED_RUN = """
import runpy, sys
sys.modules["ray"] = None
sys.argv = ["gpu_check"] + sys.argv[1:]
runpy.run_module("benchmarks.gpu_check", run_name="__main__")
"""


@pytest.mark.integration
@pytest.mark.slow
def test_gpu_check_tiny_on_cpu_without_ray(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--tiny", "--device", "cpu", "--json", str(out),
                           "--micro-batch-rows", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "ALL CHECKS PASSED" in proc.stdout, log[-6000:]
    report = json.loads(out.read_text())
    names = [name for name, _, _ in report["checks"]]
    assert report["ok"] and all(ok for _, ok, _ in report["checks"])
    for expected in ("same weights, before any update: candidate1", "after the hand-over: ar_style",
                     "rollout copy equals the learner's weights after apply", "ZeRO 0 + KL: the weights changed",
                     "end to end: rollout copy equals the learner's weights after the hand-over",
                     "no Ray imported"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    figures = report["figures"]
    for key in ("sampler_img_s", "learner_img_s", "e2e_img_s", "export_apply_seconds"):
        assert figures[key] > 0, key
    # the end-to-end stage is the product's step: its metrics line, the local backend's in-process hand-over
    assert figures["e2e_metrics"]["sync_path"] == "in_process" and figures["e2e_metrics"]["step"] == 1
    # 6 trained steps per rollout in runs of 3 rows (the GPU default, 0, sizes them from free memory)
    assert figures["micro_batch_plan"].startswith("4 rows per micro-batch, checkpointing off")
    assert figures["learner_metrics"]["micro_batches"] == 2 * figures["learner_metrics"]["rows"] / 6


@pytest.mark.integration
def test_gpu_check_tiny_meissonic_on_cpu_without_ray(tmp_path):
    """`--family meissonic`: the same stages on a tiny Meissonic (the GPU check's Meissonic-1024 path in fp32)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--tiny", "--family", "meissonic", "--device", "cpu",
                           "--json", str(out), "--micro-batch-rows", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ALL CHECKS PASSED" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads(out.read_text())
    names = [name for name, _, _ in report["checks"]]
    assert report["ok"] and all(ok for _, ok, _ in report["checks"])
    for expected in [f"same weights, before any update: {t}" for t in ("candidate1", "candidate2", "ar_style")] + [
            "rollout copy equals the learner's weights after apply", "ZeRO 0 + KL: the weights changed",
            "end to end: rollout copy equals the learner's weights after the hand-over", "no Ray imported"]:
        assert any(n.startswith(expected) for n in names), (expected, names)
    assert report["figures"]["e2e_metrics"]["step"] == 1


@pytest.mark.integration
def test_gpu_check_tiny_with_lora_hands_over_only_the_adapters(tmp_path):
    """`--lora-rank`: the end-to-end stage (the product's step) trains adapters and hands over only them; on a GPU
    this is the bf16 / CUDA path of LoRA, on the CPU here the same code in fp32."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    figures = {}
    for rank in (0, 4):
        out = tmp_path / f"rank{rank}.json"
        proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--tiny", "--device", "cpu", "--json", str(out),
                               "--lora-rank", str(rank), "--zero", "0"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "ALL CHECKS PASSED" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
        figures[rank] = json.loads(out.read_text())["figures"]["e2e_metrics"]
    assert 0 < figures[4]["sync_bytes"] < 0.5 * figures[0]["sync_bytes"], (figures[4]["sync_bytes"],
                                                                           figures[0]["sync_bytes"])
