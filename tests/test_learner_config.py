"""Learner configuration, optimizer parameter groups, LR schedule and the generated DeepSpeed config."""
from __future__ import annotations

import math

import pytest
import torch

from algorithm.config import AlgorithmConfig
from learner import Learner, LearnerConfig
from tests.updates import Planner, configs
from learner.engine import WarmupCosine, deepspeed_config, param_groups, plan_chunks
from benchmarks.tiny_models import random_showo, sample_groups


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_config_defaults_validation_and_round_trip():
    cfg, alg = LearnerConfig(), AlgorithmConfig()
    assert (alg.transition, alg.clip_low, alg.clip_high, alg.kl_beta) == ("candidate1", 0.9, 1.2, 0.0)
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.warmup_steps) == (3e-6, (0.9, 0.95), 0.02, 1000)
    assert LearnerConfig(**{**cfg.to_dict(), "betas": tuple(cfg.betas)}) == cfg
    assert AlgorithmConfig(**alg.to_dict()) == alg
    for bad in (dict(transition="candidate3"), dict(clip_low=1.1), dict(clip_high=0.95), dict(selector="half"),
                dict(loss_average="mean"), dict(advantage="ppo"), dict(zero_stage=4), dict(micro_batch_rows=-1),
                dict(kl_beta=-1.0), dict(max_consecutive_nonfinite=0)):
        with pytest.raises(ValueError):
            configs(**bad)
    with pytest.raises(ValueError, match=r"algorithm.transition='candidate3' is not a known variant; choose one of "
                                         r"\['ar_style', 'candidate1', 'candidate2'\]"):
        AlgorithmConfig(transition="candidate3")


def test_weight_decay_groups_exclude_biases_and_1d():
    model = random_showo(seed=0)
    decay, no_decay = param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 and not names[id(p)].endswith("bias") for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert any(names[id(p)].endswith("layernorm.weight") for p in no_decay["params"])
    assert any(names[id(p)] == "showo.model.embed_tokens.weight" for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_overlapping_is_the_pretraining_schedule():
    f = WarmupCosine(warmup=30, total=500, overlap=True)
    old = lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / 500)))  # noqa: E731
    assert [f(s) for s in range(0, 520, 7)] == [old(s) for s in range(0, 520, 7)]


def test_warmup_cosine():
    f = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_deepspeed_config():
    ds = deepspeed_config(LearnerConfig(zero_stage=2, grad_clip=1.0,
                                        extra_deepspeed={"zero_optimization": {"overlap_comm": False}}), bf16=False)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["gradient_clipping"] == 1.0 and ds["gradient_accumulation_steps"] == 1
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "gradient_clipping" not in deepspeed_config(LearnerConfig(grad_clip=0.0), bf16=False)
    bf = deepspeed_config(LearnerConfig(zero_stage=1), bf16=True)
    assert bf["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert bf["data_types"]["grad_accum_dtype"] == "fp32"


def _mask(keep: list[bool], steps, num_steps: int) -> torch.Tensor:
    train = torch.zeros(len(keep), num_steps, dtype=torch.bool)
    train[torch.tensor(keep).nonzero().flatten().unsqueeze(1), torch.as_tensor(steps)] = True
    return train


def test_micro_batch_plan():
    trains = [_mask([True, False, True, True], range(3), 3), _mask([False, False], range(3), 3),
              _mask([True], range(7), 7)]
    chunks = plan_chunks(trains, max_rows=6)
    # rectangles: whole trajectories when they fit, one trajectory's steps in even runs otherwise (7: 4 + 3, not 6 + 1)
    assert [(c.group, c.rows.unique.tolist(), sorted(set(c.rows.steps.tolist()))) for c in chunks] == [
        (0, [0, 2], [0, 1, 2]), (0, [3], [0, 1, 2]), (2, [0], [0, 1, 2, 3]), (2, [0], [4, 5, 6])]
    assert all(len(c.rows) <= 6 for c in chunks)
    # any other mask: samples packed in order, a sample split into even runs when it alone exceeds the rows
    ragged = torch.tensor([[True, True, True, True, True], [False, True, False, False, False],
                           [False, False, False, False, False], [True, False, True, False, False]])
    chunks = plan_chunks([ragged], max_rows=3)
    assert [list(zip(c.rows.samples.tolist(), c.rows.steps.tolist())) for c in chunks] == [
        [(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4), (1, 1)], [(3, 0), (3, 2)]]


def test_learner_lr_follows_schedule_and_bf16_needs_cuda():
    model = random_showo(seed=0)
    trajs, prompts = sample_groups(model, 1, 2, 2, seed=0)
    cfg = configs(lr=1e-3, warmup_steps=2, total_steps=4, min_lr_ratio=0.0, micro_batch_rows=4)
    learner = Learner(model, *cfg)
    planner = Planner(cfg)
    lrs = [planner.train(learner, trajs, [torch.tensor([0.0, 1.0])], prompts)["lr"] for _ in range(4)]
    f = WarmupCosine(2, 4, 0.0)
    assert lrs == pytest.approx([1e-3 * f(s) for s in range(4)])
    assert learner.step == 4 and learner.version == 4
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Learner(random_showo(seed=0), LearnerConfig(bf16=True))
