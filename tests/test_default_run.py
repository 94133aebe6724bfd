"""A CI-sized version of the default run (configs/default.yaml): pretraining, then Mask-GRPO through the real
Ray actors (rollout worker, reward actor with the GenEval engine on the shapes world, DeepSpeed learner rank).

Seed 0. The training reward must rise by more than random variation explains: the gain of the mean reward of the
last steps over the first steps is compared with the standard error of that difference, computed from the
per-step reward spreads the run itself logs.

The reward here is GenEval's partial credit without the `max_extra_objects` guard of configs/default.yaml: it is
what the loop demonstrably optimises within a CI budget (the policy can partly satisfy it by adding objects, see
the README), so this test shows that the distributed RL loop optimises the reward it is given; it does not claim
that held-out image quality improves.
"""
from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CI_OVERRIDES = [
    "max_steps=16", "learner.total_steps=16", "learner.warmup_steps=2", "learner.lr=3e-4",
    "pretrain.steps=200", "data.prompts_per_step=8", "data.group_size=8", "save_every=0",
    "data.eval_max_prompts=6", "eval.samples_per_prompt=2", "logging.sample_every=0", "seed=0",
    "rewards=[{name: geneval, weight: 1.0, detector: {name: shapes}}]",
]


def test_default_run_learns(tmp_path):
    from cluster.config import load_config
    from cluster.metrics import read_metrics
    from cluster.train import train

    cfg = load_config("configs/default.yaml", CI_OVERRIDES + [f"output_dir={tmp_path}"])
    summary = train(cfg)

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(16))
    k, n = 4, cfg.data.prompts_per_step * cfg.data.group_size
    first, last = records[:k], records[-k:]
    gain = sum(r["reward_mean"] for r in last) / k - sum(r["reward_mean"] for r in first) / k
    # standard error of a difference of two means of k step-means, each over n images
    se = math.sqrt(sum(r["reward_std"] ** 2 / n for r in first + last)) / k
    assert gain > 3 * se, f"training reward did not rise beyond noise: gain {gain:.3f}, 3·SE {3 * se:.3f}"

    # the run directory a researcher expects
    for name in ("config.yaml", "metrics.jsonl", "reward_curve.png", "base/model.safetensors",
                 "eval/step_000000.json", "eval/step_000016.json", "samples/step_000000.png"):
        assert (tmp_path / name).exists(), name
    report = json.loads((tmp_path / "eval" / "step_000016.json").read_text())
    assert set(report) >= {"overall", "categories"} and 0.0 <= report["overall"] <= 1.0
    assert (tmp_path / "checkpoints").is_dir() and summary["checkpoint"].startswith(str(tmp_path))
