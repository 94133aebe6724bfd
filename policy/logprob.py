"""Mask-GRPO transition log-probabilities of recorded trajectories under the current policy.

Batched across trajectories and steps: the (trajectory, step) pairs to score become rows of one forward pass,
each row fed the image exactly as the sampler saw it at the start of that step. The model's context is built once
per trajectory and shared by its rows (Show-o: the text prefix, with gradients flowing through it). The
per-position terms come from `policy.transition`, the same functions the sampler records the behaviour log-probs
with.

Device use: the trajectory may arrive on the CPU (as it does from the object store); it is moved to the model's
device once, every mask and index is built there, and nothing is read back to the host (no GPU sync): `steps`
is validated only when it is given on the CPU (as the learner's step selection makes it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .family import MaskedModel
from .trajectory import TRANSITIONS, Trajectory
from .transition import code_logprob, codebook_logprobs, remask_log_mass


@dataclass
class StepLogprobs:
    logprob: torch.Tensor      # float [B, S] transition log-probability of each scored step
    num_terms: torch.Tensor    # float [B, S] how many positions contribute (for per-token averaging)


def checked_steps(steps: Optional[torch.Tensor | Sequence[int]], num_steps: int,
                  device: torch.device) -> torch.Tensor:
    """`steps` as a long tensor on `device` (default: all steps). Steps given on the host (a CPU tensor or a
    sequence) are range-checked there; a device tensor is taken as it is (checking it would need a GPU sync)."""
    if steps is None:
        return torch.arange(num_steps, device=device)
    if not isinstance(steps, torch.Tensor):
        steps = torch.tensor(list(steps), dtype=torch.long)
    if steps.dim() != 1:
        raise ValueError(f"steps must be a 1-D tensor of step indices, got shape {tuple(steps.shape)}")
    if steps.device.type == "cpu":
        values = steps.tolist()
        if values and (min(values) < 0 or max(values) >= num_steps):
            raise ValueError(f"steps must lie in [0, {num_steps})")
    return steps.to(device=device, dtype=torch.long)


def all_transition_logprobs(model: MaskedModel, traj: Trajectory, steps: Optional[torch.Tensor] = None,
                            prefix_reuse: bool = True,
                            transitions: Sequence[str] = TRANSITIONS) -> dict[str, StepLogprobs]:
    """Per-step log-probabilities of `traj`'s transitions under `model` for several transition definitions at
    once (one forward pass; e.g. to compare recorded and recomputed log-probs of all three)."""
    for transition in transitions:
        if transition not in TRANSITIONS:
            raise ValueError(f"unknown transition {transition!r}; expected one of {TRANSITIONS}")
    device = next(model.parameters()).device
    steps = checked_steps(steps, traj.num_steps, device)
    traj = traj.to(device)
    b, s, n = traj.batch_size, steps.numel(), traj.num_image_tokens
    codes = traj.input_codes(steps).reshape(b * s, n)
    scale = float(traj.guidance_weight)
    cfg_on = scale != 0.0
    row_steps = steps.repeat(b)                                          # row b·S + j is step steps[j]

    def logits_for(condition) -> torch.Tensor:
        context = model.context([(condition, s)], inference=False, reuse=prefix_reuse)
        return model.logits(context, codes, row_steps, traj.num_steps)

    logits = logits_for(traj.condition)
    uncond = logits_for(traj.null_condition) if cfg_on else None
    logprobs = codebook_logprobs(logits, uncond, scale)                   # fp32 [B*S, N, C], the only one
    del logits, uncond

    masked, kept, remasked = (m.reshape(b * s, n) for m in traj.step_masks(steps))
    drawn = traj.sampled_codes.index_select(1, steps).reshape(b * s, n)
    out: dict[str, StepLogprobs] = {}
    kept_logp = None
    if "candidate1" in transitions or "candidate2" in transitions:
        # a kept position's code is the one drawn at its step (= its final code)
        kept_logp = code_logprob(logprobs, torch.where(kept, traj.final_codes.repeat_interleave(s, 0), -1))
    if "ar_style" in transitions:
        logp = code_logprob(logprobs, torch.where(masked, drawn, -1))
        out["ar_style"] = StepLogprobs(logp.sum(-1).view(b, s), masked.sum(-1).float().view(b, s))
    if "candidate2" in transitions:
        out["candidate2"] = StepLogprobs(kept_logp.sum(-1).view(b, s), kept.sum(-1).float().view(b, s))
    if "candidate1" in transitions:
        thr = traj.threshold.index_select(1, steps).reshape(b * s)
        remask = torch.where(remasked, remask_log_mass(logprobs, thr), 0.0)
        out["candidate1"] = StepLogprobs((kept_logp.sum(-1) + remask.sum(-1)).view(b, s),
                                         (kept.sum(-1) + remasked.sum(-1)).float().view(b, s))
    return out


def transition_logprobs(model: MaskedModel, traj: Trajectory, transition: str = "candidate1",
                        steps: Optional[torch.Tensor] = None, prefix_reuse: bool = True) -> StepLogprobs:
    """Per-step log-probability of `traj`'s transitions under `model` for `steps` (long [S]; default all T).

    Runs with or without autograd, as the caller chooses. Classifier-free guidance follows the trajectory's
    recorded `guidance_weight`.
    """
    if transition not in TRANSITIONS:
        raise ValueError(f"unknown transition {transition!r}; expected one of {TRANSITIONS}")
    return all_transition_logprobs(model, traj, steps, prefix_reuse, (transition,))[transition]
