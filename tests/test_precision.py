"""The speed levers of issue 11 change no number on the CPU reference path: one fp32 log-prob tensor per step
(chunked sampling, candidate 1's re-mask mass with its own backward), the preallocated prefix cache, attention in
the model's dtype, device-resident weight buckets; and `policy.dtype` decides rollout and learner precision."""
from __future__ import annotations

import pickle

import pytest
import torch

import policy.transition as transition_mod
from benchmarks.tiny_models import random_showo, tiny_showo_config
from learner.weights_export import iter_weight_buckets
from policy.factory import PolicyConfig, TokenizerConfig, compute_dtype, learner_bf16, load_policy
from policy.logprob import checked_steps
from policy.showo import Showo
from policy.transition import LOG_EPS, codebook_logprobs, remask_log_mass, sample_codes

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _reference_remask(logits: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """The reference formulation (and this repository's before issue 11): softmax, mask, sum, clamp, log."""
    probs = logits.softmax(-1)
    below = probs < thr.view(-1, 1, 1).to(probs.dtype)
    return (probs * below).sum(-1).clamp(min=LOG_EPS).log()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_remask_log_mass_value_and_gradient_equal_the_reference(dtype, monkeypatch):
    monkeypatch.setattr(transition_mod, "CHUNK_ELEMENTS", 200)          # exercise the chunking
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 7, 32, generator=gen, dtype=dtype) * 3).requires_grad_(True)
    thr = torch.tensor([0.01, 0.05, 0.2, 1e-30, 0.03], dtype=dtype)      # row 3: nothing below (clamp binds)
    ours = remask_log_mass(logits.log_softmax(-1), thr)
    weights = torch.randn(5, 7, generator=gen, dtype=dtype)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = _reference_remask(logits, thr)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(g_ours, g_ref, **tol)
    assert torch.isfinite(g_ours).all() and (g_ours[3] == 0).all()


def test_sample_codes_is_inverse_cdf_and_chunking_changes_nothing(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    logprobs = codebook_logprobs(torch.randn(4, 9, 50, generator=gen) * 2)
    u = torch.rand(4, 9, generator=gen)
    u[0, 0], u[0, 1] = 0.0, 1.0                                           # the ends: first and last code
    whole = sample_codes(logprobs, u)
    monkeypatch.setattr(transition_mod, "CHUNK_ELEMENTS", 64)
    assert torch.equal(sample_codes(logprobs, u), whole)
    cdf = logprobs.exp().cumsum(-1)
    expected = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp(max=49)
    assert torch.equal(whole, expected)
    assert whole[0, 0] == 0 and whole[0, 1] == 49


def test_cfg_logprobs_are_guided_log_softmax():
    cond, uncond = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(codebook_logprobs(cond, uncond, 1.5), (2.5 * cond - 1.5 * uncond).log_softmax(-1))
    bf16 = codebook_logprobs(cond.bfloat16())
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, cond.bfloat16().float().log_softmax(-1))


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_prefix_cache_gives_the_text_prefix_logits(guidance):
    model = random_showo(seed=2)
    layout = model.layout
    text = layout.text_area([[1, 2, 3], [5, 6]])
    codes = torch.randint(-1, layout.codebook_size, (6, layout.num_vq_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = model.encode_text(text)
        parts = [(cond, 3)]
        expected = model.image_logits(cond.repeat_interleave(3), codes)
        if guidance:
            un = model.encode_text(layout.empty_text_area(1))
            parts.append((un, 6))
            codes2 = torch.cat([codes, codes])
            expected = torch.cat([expected, model.image_logits(un, codes)])
            codes = codes2
        cache = model.prefix_cache(*parts)
        for _ in range(2):                  # the buffers are rewritten in place at every step
            torch.testing.assert_close(model.image_logits(cache, codes), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="prefix cache"):
        with torch.no_grad():
            model.image_logits(cache, codes[:2])
    model.train()
    with pytest.raises(RuntimeError, match="inference"):
        model.image_logits(cache, codes)


def test_attention_precision_switch():
    model = random_showo(seed=4)
    layout = model.layout
    ids = layout.sequence(layout.text_area([[1, 2, 3]]), torch.randint(0, layout.codebook_size, (1, layout.num_vq_tokens)))
    with torch.no_grad():
        ref = model(ids)
        model.attention_precision = "fp32"
        assert torch.equal(model(ids), ref)             # fp32 model: the two paths are the same computation
        model.to(torch.bfloat16)
        assert model.showo.model.rotary_emb.inv_freq.dtype == torch.float32
        scale = ref.abs().max().item()
        for precision in ("fp32", "model"):
            model.attention_precision = precision
            assert model.attention_precision == precision
            assert (model(ids).float() - ref).abs().max().item() < 0.05 * scale
    with pytest.raises(ValueError, match="attention_precision"):
        model.attention_precision = "fp16"


def test_policy_dtype_decides_rollout_and_learner_precision():
    assert compute_dtype("auto", "cpu") == torch.float32
    assert compute_dtype("auto", "cuda") == torch.bfloat16
    assert compute_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="policy.dtype"):
        compute_dtype("float16", "cpu")
    cfg = PolicyConfig(arch=tiny_showo_config(), dtype="auto")
    assert learner_bf16(cfg, "cuda") is True and learner_bf16(cfg, "cpu") is False
    assert learner_bf16(cfg, "cuda", requested=True) is True
    with pytest.raises(ValueError, match="same precision"):
        learner_bf16(cfg, "cuda", requested=False)
    with pytest.raises(ValueError, match="same precision"):
        learner_bf16(PolicyConfig(dtype="float32"), "cuda", requested=True)
    policy = load_policy(PolicyConfig(arch=tiny_showo_config(), dtype="bfloat16", attention_precision="fp32",
                                      tokenizer=TokenizerConfig(words=["a"])), "cpu", with_decoder=False)
    assert next(policy.model.parameters()).dtype == torch.bfloat16 and policy.model.attention_precision == "fp32"


def test_weight_buckets_pickle_with_cpu_buffers_and_move():
    model = random_showo(seed=1)
    bucket = next(iter_weight_buckets(model, 40_000, version=2))
    assert bucket.to("cpu") is bucket
    back = pickle.loads(pickle.dumps(bucket))
    assert back.flat.device.type == "cpu" and torch.equal(back.flat, bucket.flat) and back.names == bucket.names
    meta = bucket.to("meta")
    assert meta.flat.device.type == "meta" and bucket.flat.device.type == "cpu"


def test_steps_checked_on_the_host():
    assert checked_steps(None, 4).tolist() == [0, 1, 2, 3]
    assert checked_steps([1, 3], 4).tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"steps must lie in \[0, 4\)"):
        checked_steps(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="1-D"):
        checked_steps(torch.tensor([[0]]), 4)


def test_model_built_on_meta_has_the_real_layout():
    with torch.device("meta"):
        model = Showo(tiny_showo_config())
    assert model.showo.model.rotary_emb.inv_freq.device.type == "meta"
