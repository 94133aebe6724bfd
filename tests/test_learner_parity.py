"""One learner update's gradient on the fixtures' tiny Show-o equals the reference Mask-GRPO gradients.

Group of 1, advantage 0.75 supplied directly, on-policy (behaviour log-probs recomputed with the model, since
the recorded reference trajectories carry none), every step trained, sequence averaging (1/T per step).
"""
from __future__ import annotations

import pytest
import torch

from algorithm.transitions import policy_step_logprobs
from learner import Learner
from tests.reference_trajectories import load_reference_trajectories
from tests.updates import configs, given


pytestmark = pytest.mark.usefixtures("single_torch_thread")

VARIANTS = {"ar_style": "ar_style", "candidate2": "candidate2", "candidate1": "candidate1_fixed"}


def _learner_gradients(model, traj, transition: str, micro_batch_rows: int, zero_stage: int = 0):
    behaviour = policy_step_logprobs(model, traj, transition)
    learner = Learner(model, *configs(transition=transition, zero_stage=zero_stage,
                                      micro_batch_rows=micro_batch_rows, warmup_steps=1))
    state = learner.accumulate_gradients([given(traj, torch.tensor([0.75]), behaviour)])
    grads = learner.full_gradients()
    metrics = learner.apply_update(state).metrics()
    return grads, metrics


def _check_parity(transition, tiny_showo, showo_vectors, fixture_dir):
    reference_name = VARIANTS[transition]
    traj = load_reference_trajectories(fixture_dir, tiny_showo.layout)[reference_name]
    expected = {k[len(f"grad.{reference_name}."):]: v for k, v in showo_vectors.items()
                if k.startswith(f"grad.{reference_name}.")}
    assert expected, f"no reference gradients for {reference_name}"
    # micro-batches of 4 rows: the 6 steps are split 4 + 2, so accumulation is exercised too
    grads, metrics = _learner_gradients(tiny_showo, traj, transition, micro_batch_rows=4)
    for name, ref in expected.items():
        got = grads[name]
        scale = ref.abs().max().item()
        assert scale > 0
        err = (got - ref).abs().max().item() / scale
        assert err < 1e-5, f"{transition} {name}: relative error {err:.2e}"
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["clip_frac"] == 0.0
    assert metrics["loss"] == pytest.approx(-0.75, rel=1e-5)        # Σ_t −0.75·r_t / T with r = 1
    assert metrics["micro_batches"] == 2 and metrics["rows"] == traj.num_steps
    assert metrics["version"] == 1 and metrics["nonfinite_skipped"] == 0


def test_learner_parity_grad_ar_style(tiny_showo, showo_vectors, fixture_dir):
    _check_parity("ar_style", tiny_showo, showo_vectors, fixture_dir)


def test_learner_parity_grad_candidate2(tiny_showo, showo_vectors, fixture_dir):
    _check_parity("candidate2", tiny_showo, showo_vectors, fixture_dir)


def test_learner_parity_grad_candidate1(tiny_showo, showo_vectors, fixture_dir):
    _check_parity("candidate1", tiny_showo, showo_vectors, fixture_dir)
