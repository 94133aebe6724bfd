"""Mask-GRPO transition log-probabilities of recorded trajectories under the current policy.

Batched across trajectories and steps: the (trajectory, step) pairs to score become rows of one forward pass,
each row fed the image exactly as the sampler saw it at the start of that step. The text prefix is encoded once
per trajectory and shared by its rows (gradients flow through it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .showo import Showo, TextPrefix
from .trajectory import TRANSITIONS, Trajectory
from .transition import codebook_probs, code_logprob, remask_log_mass


@dataclass
class StepLogprobs:
    logprob: torch.Tensor      # float [B, S] transition log-probability of each scored step
    num_terms: torch.Tensor    # float [B, S] how many positions contribute (for per-token averaging)


def transition_logprobs(model: Showo, traj: Trajectory, transition: str = "candidate1",
                        steps: Optional[torch.Tensor] = None, prefix_reuse: bool = True) -> StepLogprobs:
    """Per-step log-probability of `traj`'s transitions under `model` for `steps` (long [S]; default all T).

    Runs with or without autograd, as the caller chooses. Classifier-free guidance follows the trajectory's
    recorded `guidance_scale`.
    """
    if transition not in TRANSITIONS:
        raise ValueError(f"unknown transition {transition!r}; expected one of {TRANSITIONS}")
    device = next(model.parameters()).device
    traj = traj.to(device)
    num_steps = traj.num_steps
    steps = torch.arange(num_steps, device=device) if steps is None else steps.to(device).long()
    if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= num_steps):
        raise ValueError(f"steps must lie in [0, {num_steps})")
    b, s, n = traj.batch_size, steps.numel(), traj.num_image_tokens
    codes = traj.input_codes(steps).reshape(b * s, n)
    scale = float(traj.guidance_scale)
    cfg_on = scale != 0.0

    def logits_for(text: torch.Tensor) -> torch.Tensor:
        if prefix_reuse:
            return model.image_logits(model.encode_text(text).repeat_interleave(s), codes)
        return model.image_logits_full(text.repeat_interleave(s, 0), codes)

    logits = logits_for(traj.text_ids)
    uncond = logits_for(traj.uncond_text_ids) if cfg_on else None
    probs = codebook_probs(logits, uncond, scale)                          # [B*S, N, C]

    masked, kept, remasked = (m[:, steps].reshape(b * s, n) for m in traj.step_masks())
    drawn = traj.sampled_codes[:, steps].reshape(b * s, n)
    if transition == "ar_style":
        scored = masked
        logp = code_logprob(probs, torch.where(masked, drawn, -1))
    else:
        scored = kept
        logp = code_logprob(probs, torch.where(kept, traj.final_codes.repeat_interleave(s, 0), -1))
    total = (logp * scored).sum(-1)
    count = scored.sum(-1).float()
    if transition == "candidate1":
        thr = traj.threshold[:, steps].reshape(b * s)
        total = total + (remask_log_mass(probs, thr) * remasked).sum(-1)
        count = count + remasked.sum(-1).float()
    return StepLogprobs(total.view(b, s), count.view(b, s))
