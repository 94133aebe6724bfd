"""Micro-batch rows and checkpointing from free GPU memory (`learner.memory`): the plan's rules, and the learner
using it (free memory faked on the CPU: the same code path as on a GPU, seed 5 as test_learner_engine)."""
from __future__ import annotations

import pytest
import torch

import learner.engine as engine
from learner import Learner, LearnerConfig
from learner.memory import CPU_ROWS, MAX_AUTO_ROWS, MEMORY_SHARE, MicroBatchPlan, plan_micro_batches
from benchmarks.tiny_models import tiny_showo_config
from tests.helpers.learner import fixed_batch, model_with
from policy.showo import ShowoConfig
from tests.updates import Planner, configs

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GIB = 2 ** 30
SHOWO_512 = ShowoConfig(num_vq_tokens=1024)         # Show-o-512's shapes: phi-1.5, 1024 image tokens
PER_ROW = SHOWO_512.activation_bytes_per_row        # the family's estimate the planner is given


def test_estimate_grows_with_the_sequence_and_checkpointing_saves_most_of_it():
    small, large = ShowoConfig(num_vq_tokens=256), SHOWO_512
    for ckpt in (False, True):
        assert large.activation_bytes_per_row(ckpt) > 3.5 * small.activation_bytes_per_row(ckpt)
    # phi-1.5 keeps ~57k values per token and layer without recomputation, ~2k (the layer input) with it
    assert 2.5 * GIB < large.activation_bytes_per_row(False) < 3 * GIB
    assert large.activation_bytes_per_row(True) < 0.15 * large.activation_bytes_per_row(False)


def test_plan_rules():
    configured = plan_micro_batches(PER_ROW, 50, True, free=80 * GIB)
    assert configured == MicroBatchPlan(50, True, "as configured")
    cpu = plan_micro_batches(PER_ROW, 0, None, free=None)
    assert (cpu.rows, cpu.checkpointing) == (CPU_ROWS, False)
    assert plan_micro_batches(PER_ROW, 12, None, free=None).rows == 12

    roomy = plan_micro_batches(PER_ROW, 0, None, free=130 * GIB)     # an idle H200: no recomputation needed
    assert not roomy.checkpointing
    assert roomy.rows == int(MEMORY_SHARE * 130 * GIB // SHOWO_512.activation_bytes_per_row(False)) == 28
    tight = plan_micro_batches(PER_ROW, 0, None, free=40 * GIB)      # fewer than 16 rows fit: recompute
    assert tight.checkpointing and tight.rows == int(MEMORY_SHARE * 40 * GIB // SHOWO_512.activation_bytes_per_row(True))
    assert "40.0 GiB free" in tight.why and f"{tight.rows} fit" in tight.why
    capped = plan_micro_batches(ShowoConfig(num_vq_tokens=16).activation_bytes_per_row, 0, None, free=130 * GIB)
    assert capped.rows == MAX_AUTO_ROWS
    # fixed rows, automatic checkpointing: on exactly when those rows do not fit without it
    assert not plan_micro_batches(PER_ROW, 20, None, free=130 * GIB).checkpointing
    assert plan_micro_batches(PER_ROW, 30, None, free=130 * GIB).checkpointing
    # before the first update the optimizer state's bytes are kept free
    first = plan_micro_batches(PER_ROW, 0, False, free=130 * GIB, reserved=20 * GIB)
    assert first.rows < roomy.rows and "kept for the first update" in first.why
    # nothing fits: one row, and the line says what will happen
    starved = plan_micro_batches(PER_ROW, 0, None, free=GIB // 10)
    assert starved.rows == 1 and "out-of-memory" in starved.why


def test_config_accepts_auto_and_rejects_negative_rows():
    assert LearnerConfig(micro_batch_rows=0, gradient_checkpointing=None).micro_batch_rows == 0
    with pytest.raises(ValueError, match="micro_batch_rows"):
        LearnerConfig(micro_batch_rows=-1)


@pytest.fixture(scope="module")
def batch():
    return fixed_batch()


def _gradients(batch, config) -> tuple[Learner, dict[str, torch.Tensor], float]:
    state, trajs, rewards, prompts = batch
    learner = Learner(model_with(state), *config)
    stats = learner.accumulate_gradients(Planner(config).plan(trajs, rewards, prompts).groups)
    return learner, learner.full_gradients(), stats.micro_batches


def test_learner_follows_the_plan_from_free_memory(batch, monkeypatch, capsys):
    """Free memory for 3 recomputed rows and fewer than 16 plain ones: the learner turns checkpointing on, cuts
    the 4 trained steps of each rollout into runs of 2 rows, and its gradients equal those of that fixed config."""
    kw = dict(transition="candidate1", selector="all", advantage="group", seed=11)
    fixed, fixed_grads, fixed_chunks = _gradients(batch, configs(micro_batch_rows=2, gradient_checkpointing=True, **kw))
    cfg = tiny_showo_config()                            # the fixed batch's model
    free = int(3.5 * cfg.activation_bytes_per_row(True) / MEMORY_SHARE)
    monkeypatch.setattr(engine, "free_bytes", lambda device: free)
    auto, auto_grads, auto_chunks = _gradients(batch, configs(micro_batch_rows=0, gradient_checkpointing=None, **kw))
    assert (auto.micro_batch_plan.rows, auto.micro_batch_plan.checkpointing) == (3, True)
    assert auto.policy.gradient_checkpointing and fixed.policy.gradient_checkpointing
    assert auto_chunks == fixed_chunks == 2 * 3 * 2           # 6 rollouts x 4 steps in even runs of 2 (not 3 + 1)
    assert "learner rank 0: 3 rows per micro-batch, checkpointing on" in capsys.readouterr().out
    scale = max(g.abs().max().item() for g in fixed_grads.values())
    for k, g in fixed_grads.items():
        assert (auto_grads[k] - g).abs().max().item() <= 1e-6 * scale, k


def test_auto_on_the_cpu_is_the_cpu_default(batch):
    kw = dict(transition="candidate2", selector="all", advantage="group", seed=11)
    auto, auto_grads, _ = _gradients(batch, configs(micro_batch_rows=0, gradient_checkpointing=None, **kw))
    _, grads, _ = _gradients(batch, configs(micro_batch_rows=CPU_ROWS, **kw))
    assert (auto.micro_batch_plan.rows, auto.micro_batch_plan.checkpointing) == (CPU_ROWS, False)
    for k, g in grads.items():
        assert torch.equal(auto_grads[k], g), k
