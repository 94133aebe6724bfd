"""The per-position terms of Mask-GRPO's transition probabilities, shared by the sampler (behaviour policy)
and the learner (current policy) so that both compute exactly the same numbers.

At an unmasking step the model predicts a distribution p over the codebook at every position. The transition
definitions of the paper score:
- ``ar_style``   every still-masked position: log p(sampled code);
- ``candidate2`` the newly unmasked (kept) positions: log p(kept code);
- ``candidate1`` candidate 2, plus at each re-masked position log Σ_{v: p(v) < threshold} p(v), where the
  threshold is the probability of the lowest-confidence kept token of that step (the probability that the
  position's sample would have been less confident than every kept token).
"""
from __future__ import annotations

import torch

LOG_EPS = 1e-20   # as the reference's log(): log of an empty low-probability mass is log(1e-20), not -inf


def codebook_probs(logits: torch.Tensor, uncond_logits: torch.Tensor | None = None,
                   guidance_scale: float = 0.0) -> torch.Tensor:
    """Float32 probabilities over the codebook, with classifier-free guidance ``(1+s)·cond − s·uncond``."""
    logits = logits.float()
    if uncond_logits is not None and guidance_scale != 0.0:
        logits = (1.0 + guidance_scale) * logits - guidance_scale * uncond_logits.float()
    return logits.softmax(dim=-1)


def code_logprob(probs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """log p(code) [R, N] for codes [R, N]; entries with code < 0 give 0."""
    picked = probs.gather(-1, codes.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(codes >= 0, picked.clamp(min=LOG_EPS).log(), torch.zeros_like(picked))


def remask_log_mass(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """log Σ_{v: p(v) < threshold} p(v) [R, N] for a per-row threshold [R]."""
    below = probs < threshold.view(-1, 1, 1).to(probs.dtype)
    return (probs * below).sum(-1).clamp(min=LOG_EPS).log()
