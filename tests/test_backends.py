"""The two backends of the role groups: `local` (every role in this process, Ray never imported) and `ray`.

The same config and seed give the same run on both: identical metrics (rewards, losses) and identical final
weights, synchronous and with staleness 1 (seed 0, configs/tiny.yaml, one rollout worker, one reward actor, one
learner rank). The local backend also runs where Ray cannot be imported at all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.backend import LocalBackend, LocalFuture
from cluster.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def _cfg(out: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={out}", "learner.warmup_steps=0", "learner.lr=1e-3", "max_steps=4",
                              "eval.at_start=false", *overrides])


def _run(out: Path, *overrides: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    from cluster.train import train
    summary = train(_cfg(out, *overrides))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines, load_file(str(Path(summary["checkpoint"]) / "pytorch_model.safetensors"))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_local_and_ray_backends_give_the_same_run(local_ray, tmp_path, staleness):
    local, w_local = _run(tmp_path / "local", "cluster.backend=local", f"cluster.max_staleness={staleness}")
    remote, w_ray = _run(tmp_path / "ray", "cluster.backend=ray", f"cluster.max_staleness={staleness}")
    assert [r["step"] for r in local] == [r["step"] for r in remote] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "loss", "version", "staleness_hist", "learner/ratio_max",
                "learner/grad_norm"):
        assert [r[key] for r in local] == [r[key] for r in remote], key
    assert any(r["loss"] != 0.0 for r in local) and len({r["reward_mean"] for r in local}) > 1   # it trained
    if staleness:
        assert any(r["staleness_max"] == 1 for r in local)
    assert local[0]["sync_path"] == "in_process" and remote[0]["sync_path"] == "collective"
    assert w_local.keys() == w_ray.keys()
    assert all(torch.equal(w_local[k], w_ray[k]) for k in w_local)


# Importing Ray raises ImportError in the child, as on a GPU machine that has only torch and the small wheels.
NO_RAY = """
import runpy, sys
sys.modules["ray"] = None
sys.argv = ["cluster.train"] + sys.argv[1:]
runpy.run_module("cluster.train", run_name="__main__")
"""


@pytest.mark.slow
def test_local_backend_trains_where_ray_cannot_be_imported(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_RAY, "--config", TINY, "cluster.backend=local",
                           f"output_dir={tmp_path}", "max_steps=2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1] and lines[-1]["sync_path"] == "in_process"
    assert (tmp_path / "eval" / "step_000002.json").is_file() and (tmp_path / "checkpoints" / "step_000002").is_dir()
    assert "weight sync: in_process" in proc.stdout


def test_local_backend_runs_calls_at_once_and_raises_at_get():
    class Actor:
        def __init__(self, k):
            self.k = k

        def add(self, x):
            return x + self.k

        def pair(self, x):
            return x, -x

        def fail(self):
            raise ValueError("boom")

    backend = LocalBackend()
    from cluster.backend import ActorSpec
    a = backend.start(ActorSpec(Actor, (10,)))
    first = backend.call(a, "add", 1)
    assert isinstance(first, LocalFuture) and backend.get(first) == 11
    assert backend.get(backend.call(a, "add", first)) == 21           # a future as an argument is resolved
    assert backend.get(backend.call(a, "pair", 3, num_returns=2)) == [3, -3]
    failed = backend.call(a, "fail")                                  # the error waits for get(), as on Ray
    with pytest.raises(ValueError, match="boom"):
        backend.get(failed)
    with pytest.raises(ValueError, match="boom"):                     # and taints the calls that consume it
        backend.get(backend.call(a, "add", failed))
    assert backend.wait([first, failed]) == ([first, failed], [])


def test_local_reward_group_retries_a_failed_call_on_the_next_actor(tmp_path):
    from cluster.reward_group import RewardGroup
    flag = tmp_path / "fail_once"
    flag.touch()
    spec = {"name": "tests.helpers.rewards:FlakyReward", "label": "flaky", "flag_file": str(flag)}
    group = RewardGroup.create(LocalBackend(), [spec], num_actors=2)
    images = torch.full((3, 8, 8, 3), 51, dtype=torch.uint8)
    out = group.score_groups([{"images": images, "prompts": ["a", "b", "c"]}])
    assert group.retries == 1 and not flag.exists()
    assert torch.allclose(out[0].rewards, torch.full((3,), 0.2)) and set(out[0].components) == {"flaky"}


def test_local_backend_takes_one_learner_rank_and_no_address():
    with pytest.raises(ConfigError, match="num_learner_ranks=1"):
        load_config(TINY, ["cluster.backend=local", "cluster.num_learner_ranks=2", "data.prompts_per_step=2"])
    with pytest.raises(ConfigError, match="starts no Ray"):
        load_config(TINY, ["cluster.backend=local", "cluster.address=auto"])
