"""The per-position terms of Mask-GRPO's transition probabilities, shared by the sampler (behaviour policy)
and the learner (current policy) so that both compute exactly the same numbers.

At an unmasking step the model predicts a distribution p over the codebook at every position. The transition
definitions of the paper score:
- ``ar_style``   every still-masked position: log p(sampled code);
- ``candidate2`` the newly unmasked (kept) positions: log p(kept code);
- ``candidate1`` candidate 2, plus at each re-masked position log Σ_{v: p(v) < threshold} p(v), where the
  threshold is the probability of the lowest-confidence kept token of that step (the probability that the
  position's sample would have been less confident than every kept token).

Precision and memory. Both sides take the model's logits in its own dtype (`policy.factory.compute_dtype`: bf16 on
GPUs, fp32 on the CPU) and form fp32 log-probabilities ONCE per step (`codebook_logprobs`, a log-softmax that
upcasts inside the kernel); every term is read from that one [R, N, C] tensor: gathers for the sampled/kept codes,
and the below-threshold mass by `remask_log_mass`, which works through the codebook in chunks (no second
[R, N, C] tensor, and under autograd it saves nothing beyond the log-softmax's own output). Token sampling
(`sample_codes`) also works in chunks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_EPS = 1e-20                   # as the reference's log(): log of an empty low-probability mass is log(1e-20)
MIN_LOGPROB = math.log(LOG_EPS)   # the same floor for log p(code)
CHUNK_ELEMENTS = 1 << 25          # elements of the [R·N, C] log-probs handled at once by the chunked helpers


def codebook_logprobs(logits: torch.Tensor, uncond_logits: torch.Tensor | None = None,
                      guidance_weight: float = 0.0) -> torch.Tensor:
    """Float32 log-probabilities over the codebook [..., C], with classifier-free guidance
    ``(1+w)·cond − w·uncond`` on the logits (in fp32; w from the family's `guidance_weight`)."""
    if uncond_logits is not None and guidance_weight != 0.0:
        logits = (1.0 + guidance_weight) * logits.float() - guidance_weight * uncond_logits.float()
        return logits.log_softmax(dim=-1)
    return F.log_softmax(logits, dim=-1, dtype=torch.float32)


def code_logprob(logprobs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """log p(code) [R, N] for codes [R, N] from log-probs [R, N, C] (floored at log 1e-20); code < 0 gives 0."""
    picked = logprobs.gather(-1, codes.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(codes >= 0, picked.clamp(min=MIN_LOGPROB), torch.zeros_like(picked))


def _row_chunks(rows: int, width: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


def _below_mass(flat: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Σ_{v: p(v) < thr} p(v) per row of log-probs flat [M, C] with thresholds thr [M] (probabilities)."""
    out = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    for a, b in _row_chunks(flat.shape[0], flat.shape[1]):
        p = flat[a:b].exp()
        out[a:b] = torch.where(p < thr[a:b, None], p, 0.0).sum(-1)
    return out


class _RemaskLogMass(torch.autograd.Function):
    """log max(Σ_{v: p(v) < thr} p(v), 1e-20) from fp32 log-probs; gradient p(v)·[p(v) < thr] / mass (zero
    where the clamp binds), which is what autograd gives for the reference's softmax formulation."""

    @staticmethod
    def forward(ctx, logprobs: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        r, n, c = logprobs.shape
        flat = logprobs.reshape(r * n, c)
        thr_rows = thr.to(logprobs.dtype).reshape(r, 1).expand(r, n).reshape(r * n)
        mass = _below_mass(flat, thr_rows)
        ctx.save_for_backward(logprobs, thr_rows, mass)
        return mass.clamp(min=LOG_EPS).log().view(logprobs.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logprobs, thr_rows, mass = ctx.saved_tensors
        c = logprobs.shape[-1]
        flat = logprobs.reshape(-1, c)
        scale = torch.where(mass >= LOG_EPS, grad.reshape(-1) / mass, 0.0)
        out = torch.empty_like(flat)
        for a, b in _row_chunks(flat.shape[0], c):
            p = flat[a:b].exp()
            out[a:b] = torch.where(p < thr_rows[a:b, None], p * scale[a:b, None], 0.0)
        return out.view(logprobs.shape), None


def remask_log_mass(logprobs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """log Σ_{v: p(v) < threshold} p(v) [R, N] from fp32 log-probs [R, N, C] and a per-row threshold
    probability [R] (differentiable in the log-probs)."""
    if logprobs.dim() != 3 or threshold.numel() != logprobs.shape[0]:
        raise ValueError(f"need log-probs [R, N, C] and one threshold per row; got {tuple(logprobs.shape)} and "
                         f"{tuple(threshold.shape)}")
    return _RemaskLogMass.apply(logprobs, threshold)


def sample_codes(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples long [R, N] from log-probs [R, N, C] and uniforms [R, N]: the first code whose
    cumulative probability reaches u (clamped to the codebook). Works through the rows in chunks, so the CDF
    never exists for the whole batch at once."""
    c = logprobs.shape[-1]
    flat = logprobs.reshape(-1, c)
    u = uniforms.reshape(-1, 1).to(flat.dtype)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for a, b in _row_chunks(flat.shape[0], c):
        cdf = flat[a:b].exp().cumsum_(-1)
        out[a:b] = torch.searchsorted(cdf, u[a:b].contiguous()).squeeze(-1)
    return out.clamp_(max=c - 1).view(uniforms.shape)


def neg_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Σ_c p_c log p_c [..., ] per position from fp32 log-probs [..., C] (the negative entropy, <= 0; a code
    with p = 0 contributes 0). Works through the rows in chunks, so no second full-size tensor exists."""
    c = logprobs.shape[-1]
    flat = logprobs.reshape(-1, c)
    out = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    for a, b in _row_chunks(flat.shape[0], c):
        lp = flat[a:b]
        p = lp.exp()
        out[a:b] = torch.where(p > 0, p * lp, 0.0).sum(-1)
    return out.view(logprobs.shape[:-1])
