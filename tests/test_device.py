"""Every GPU code path is device-clean, checked on the CPU: the policy, sampler, transition log-probs, loss,
reference (KL) log-probs and weight export/apply run with the model on a *fake* CUDA device.

PyTorch's FakeTensorMode gives tensors a device and a shape but no data, on a machine without a GPU. It raises
`FakeTensorDeviceMismatchError` when an operation mixes CPU and CUDA tensors (the bug of issue 11:
`Trajectory.step_masks` compared a CPU `arange` with the trajectory's CUDA tensors), and
`DataDependentOutputException` when code reads a device tensor's value on the host (`int(t)`, `.item()`,
`.tolist()`, `nonzero`): on a GPU that is a synchronisation, which the hot paths must not have. Trajectories
come back from the sampler as (fake) CPU tensors, as they cross the object store; step subsets are real CPU
tensors, as the learner's step selection makes them.

Tests marked `gpu` run the same paths on a real GPU (skipped without one), with the bf16 agreement of recorded
and recomputed log-probs that the learner's importance ratio relies on.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from learner.engine import PolicyObjective
from algorithm.config import AlgorithmConfig
from algorithm.losses.clipped import Clipped
from algorithm.transitions import transition as transition_definition
from policy.logprob import RowView, Rows
from benchmarks.tiny_models import random_showo, tiny_showo_config
from learner.weights_export import apply_weight_bucket, iter_weight_buckets
from algorithm.transitions import all_transition_logprobs, behaviour_logprob, transition_logprobs
from policy.sampler import SamplerConfig, UnmaskingSampler
from policy.showo import Showo
from algorithm.transitions import TRANSITION_NAMES as TRANSITIONS

PROMPTS = [[1, 2, 3], [40, 41, 42, 43]]
STEP_SUBSET = torch.tensor([0, 2, 3])          # a real CPU tensor, as `learner.reduction.select_steps` makes


def _fake_cuda_model(mode: FakeTensorMode, dtype: torch.dtype = torch.float32) -> Showo:
    """A tiny Show-o whose parameters are fake CUDA tensors of `dtype` (built in that default dtype:
    `Module.to` cannot swap fake parameters)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with mode, torch.device("cuda"):
            return Showo(tiny_showo_config(num_vq_tokens=16, codebook_size=64))
    finally:
        torch.set_default_dtype(default)


def _is_fake_on(t: torch.Tensor, device_type: str) -> bool:
    return isinstance(t, FakeTensor) and t.device.type == device_type


@pytest.fixture()
def mode():
    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_sampler_and_transition_logprobs_on_fake_cuda(mode, dtype, guidance):
    model = _fake_cuda_model(mode, dtype)
    assert _is_fake_on(next(model.parameters()), "cuda")
    with mode:
        text = {"ids": model.layout.text_area(PROMPTS)}        # built on the CPU, as a worker does
        traj = UnmaskingSampler(model, SamplerConfig(steps=4, guidance_scale=guidance)).sample(
            text, list(range(6)), group_size=3, null_condition=model.padding_condition())
        # the record crosses to the rewards and the learner as CPU tensors
        assert all(_is_fake_on(t, "cpu") for t in (traj.final_codes, traj.token_logprob, traj.threshold))
        for transition in TRANSITIONS:
            beh = behaviour_logprob(traj, transition)
            assert beh.shape == (6, 4) and beh.device.type == "cpu"
            with torch.no_grad():
                full = transition_logprobs(model, traj, transition)
                sub = transition_logprobs(model, traj, transition, steps=STEP_SUBSET)
                unshared = transition_logprobs(model, traj, transition, steps=STEP_SUBSET, prefix_reuse=False)
            assert _is_fake_on(full.logprob, "cuda") and full.logprob.shape == (6, 4)
            assert sub.logprob.shape == (6, 3) and unshared.logprob.shape == (6, 3)
            assert full.logprob.dtype == torch.float32            # fp32 log-probs from bf16 logits too
            # the trajectory itself on the device (e.g. kept there in one process)
            masks = traj.to("cuda").step_masks(STEP_SUBSET)
            assert all(_is_fake_on(m, "cuda") and m.shape == (6, 3, 16) for m in masks)
            on_device = traj.to("cuda")
            rows = Rows.grid(torch.arange(6), STEP_SUBSET).to("cuda")
            assert transition_definition(transition).num_terms(RowView.of(on_device, rows)).device.type == "cuda"
        assert set(all_transition_logprobs(model, traj, STEP_SUBSET)) == set(TRANSITIONS)


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_objective_loss_and_kl_on_fake_cuda(mode, transition):
    """`PolicyObjective` (the module DeepSpeed wraps) and the clipped loss with a k3 KL against a reference's
    log-probs (the engine's reference path), on the fake device. (The autograd engine itself needs a real CUDA
    context, so the backward pass is run by the `gpu` tests; our one custom backward is checked below.)"""
    model = _fake_cuda_model(mode).train()
    reference = _fake_cuda_model(mode).eval().requires_grad_(False)
    with mode:
        traj = UnmaskingSampler(model, SamplerConfig(steps=4)).sample({"ids": model.layout.text_area(PROMPTS)},
                                                                      list(range(4)), group_size=2)
        rows = Rows.grid(torch.arange(4), STEP_SUBSET)                                   # planned on the host
        logp, terms = PolicyObjective(model, transition)(traj.to("cuda"), rows.to("cuda"))
        assert _is_fake_on(logp, "cuda") and logp.requires_grad and terms.shape == (4 * 3,)
        with torch.no_grad():
            ref = transition_logprobs(reference, traj, transition, STEP_SUBSET).logprob
        behaviour = behaviour_logprob(traj, transition)[:, STEP_SUBSET].reshape(-1)   # CPU, as recorded
        advantages = torch.linspace(-1.0, 1.0, 4).repeat_interleave(3)                  # CPU
        out = Clipped(AlgorithmConfig(kl_beta=0.01))(logp.float().reshape(-1), behaviour, advantages,
                                                     ref_logp=ref.reshape(-1))
        assert _is_fake_on(out.loss, "cuda") and out.kl is not None and out.loss.requires_grad


class _Ctx:
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def test_remask_mass_backward_on_fake_cuda(mode):
    """The custom autograd function of candidate 1's re-mask term, forward and backward, on the fake device."""
    from policy.transition import _RemaskLogMass
    with mode:
        logprobs = torch.randn(6, 16, 64, device="cuda").log_softmax(-1)
        thr = torch.rand(6, device="cuda")
        ctx = _Ctx()
        out = _RemaskLogMass.forward(ctx, logprobs, thr)
        grad, none = _RemaskLogMass.backward(ctx, torch.ones_like(out))
        assert _is_fake_on(out, "cuda") and out.shape == (6, 16)
        assert _is_fake_on(grad, "cuda") and grad.shape == logprobs.shape and none is None


def test_weight_export_and_apply_on_fake_cuda(mode):
    sender = _fake_cuda_model(mode)
    receiver = _fake_cuda_model(mode, torch.bfloat16)
    with mode:
        buckets = list(iter_weight_buckets(sender, 40_000, version=3, dtype=torch.bfloat16))
        assert len(buckets) > 1 and all(_is_fake_on(b.flat, "cuda") for b in buckets)   # no host round trip
        assert all(apply_weight_bucket(receiver, b) == 3 for b in buckets)
        # the object-store path: CPU buffers, applied to the device model
        cpu = list(iter_weight_buckets(sender, 40_000, version=4, device="cpu"))
        assert all(_is_fake_on(b.flat, "cpu") for b in cpu)
        assert all(apply_weight_bucket(receiver, b) == 4 for b in cpu)
        assert all(_is_fake_on(b.to("cpu").flat, "cpu") for b in buckets)


def test_fake_mode_catches_a_device_mix_and_a_host_read(mode):
    """The checks this file relies on: a CPU/CUDA mix and a host read of device data both raise."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorDeviceMismatchError
    with mode:
        x = torch.zeros(3, device="cuda")
        with pytest.raises(FakeTensorDeviceMismatchError):
            x.view(1, 3) >= torch.arange(3).view(3, 1)
        with pytest.raises(DataDependentOutputException):
            int(x.min())


# ----- on a real GPU --------------------------------------------------------------------------------------------
def _ratio_stats(recorded: torch.Tensor, recomputed: torch.Tensor) -> tuple[float, float]:
    ratio = (recomputed.double().cpu() - recorded.double().cpu()).exp()
    return float((ratio - 1).abs().median()), float(((ratio < 0.9) | (ratio > 1.2)).double().mean())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_recorded_logprobs_equal_recomputed(dtype):
    """On a GPU, in fp32 and bf16: what the sampler records is what the learner recomputes with the same weights,
    for every transition, with and without CFG (the importance ratio starts at 1, not at noise)."""
    torch.manual_seed(0)
    model = random_showo(seed=3, config=tiny_showo_config(hidden=128, layers=3, num_vq_tokens=64,
                                                          codebook_size=256)).to("cuda", dtype)
    text = {"ids": model.layout.text_area(PROMPTS)}
    for guidance in (0.0, 2.0):
        traj = UnmaskingSampler(model, SamplerConfig(steps=8, guidance_scale=guidance)).sample(
            text, list(range(8)), group_size=4, null_condition=model.padding_condition())
        with torch.no_grad():
            recomputed = all_transition_logprobs(model, traj)
            sub = all_transition_logprobs(model, traj, STEP_SUBSET)
        for transition in TRANSITIONS:
            median, outside = _ratio_stats(behaviour_logprob(traj, transition), recomputed[transition].logprob)
            assert median <= (1e-5 if dtype == torch.float32 else 1e-3), (transition, guidance, median)
            assert outside <= 0.01, (transition, guidance, outside)
            torch.testing.assert_close(sub[transition].logprob, recomputed[transition].logprob[:, STEP_SUBSET],
                                       rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
def test_gpu_bf16_drift_from_fp32_is_small():
    """bf16 (fused attention) vs fp32 logits of the same weights: the drift that a bf16 policy has from the fp32
    reference (not a sampler/learner mismatch: both sides use the same dtype)."""
    model = random_showo(seed=3, config=tiny_showo_config(hidden=128, layers=3, num_vq_tokens=64,
                                                          codebook_size=256)).to("cuda")
    text = model.layout.text_area(PROMPTS).cuda()
    codes = torch.randint(-1, 256, (2, 64), device="cuda")
    with torch.no_grad():
        ref = model.image_logits(model.encode_text(text), codes).float()
        model.to(torch.bfloat16)
        low = model.image_logits(model.encode_text(text), codes).float()
    assert (low - ref).abs().max().item() <= 0.1 * ref.abs().max().item()


@pytest.mark.gpu
def test_gpu_weight_buckets_stay_on_the_device():
    sender = random_showo(seed=1).cuda()
    receiver = random_showo(seed=2).cuda().to(torch.bfloat16)
    for bucket in iter_weight_buckets(sender, 40_000, version=5, dtype=torch.bfloat16):
        assert bucket.flat.is_cuda
        apply_weight_bucket(receiver, bucket)
    for (name, a), (_, b) in zip(sender.named_parameters(), receiver.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert not math.isnan(float(next(receiver.parameters()).float().sum()))
