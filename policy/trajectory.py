"""The record of a batch of unmasking rollouts: what crosses from rollout workers to rewards and learner.

Everything is a dense, contiguous CPU tensor so that a trajectory pickles into the Ray object store as a
handful of buffers (zero-copy reads), never as Python lists of tensors.

Shapes: B rollouts (e.g. the G samples of one GRPO group), T unmasking steps, N image tokens. The condition is the
family's (`policy.family`): a dict of tensors with B rows (Show-o: its text area; Meissonic: text embeddings).
A position is *masked at the start of step t* iff ``unmask_step >= t``; it is *kept* (committed) at step t iff
``unmask_step == t`` and *re-masked* at step t iff ``unmask_step > t``. ``unmask_step == T`` marks a position that
was never committed by a keep (the reference sampler re-masks one token at its last step and still emits the
last sample there; our own sampler commits every position by the last step).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import torch

_CONDITIONS = ("condition", "null_condition")


@dataclass
class Trajectory:
    condition: dict[str, torch.Tensor]       # per rollout, the prompt's condition (`policy.family.Condition`)
    null_condition: dict[str, torch.Tensor]  # per rollout, the null/negative prompt's condition ({} without guidance)
    unmask_step: torch.Tensor       # long [B, N]   step at which each position was committed (T = never)
    sampled_codes: torch.Tensor     # long [B, T, N] code drawn at each still-masked position at each step (else -1)
    token_logprob: torch.Tensor     # float [B, T, N] behaviour log p(sampled code) where masked at step start (else 0)
    remask_logprob: torch.Tensor    # float [B, T, N] behaviour log Σ_{v: p(v) < threshold} p(v) where re-masked (else 0)
    threshold: torch.Tensor         # float [B, T]  confidence threshold probability of each step (candidate 1)
    final_codes: torch.Tensor       # long [B, N]   the image's codes
    # float [B, T]: per step, the mean over the positions masked at its start of Σ_c p_c log p_c of the
    # distribution the codes were drawn from (the guided one under classifier-free guidance); None if not recorded
    self_certainty: Optional[torch.Tensor] = None
    guidance_weight: float = 0.0    # w of (1 + w)·cond − w·uncond the codes were drawn with (`policy.family`)
    policy_version: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # prompt id, group id, timings: small values only

    @property
    def batch_size(self) -> int:
        return int(self.final_codes.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.sampled_codes.shape[1])

    @property
    def num_image_tokens(self) -> int:
        return int(self.final_codes.shape[1])

    def certainty_score(self) -> torch.Tensor:
        """Self-certainty per rollout, float [B]: the per-step values averaged over the T steps."""
        if self.self_certainty is None:
            raise ValueError("this trajectory has no self_certainty (recorded by policy.sampler.UnmaskingSampler)")
        return self.self_certainty.mean(-1)

    def step_masks(self, steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bool [B, T, N] masks (or [B, S, N] for `steps` [S]): (masked at start of step, kept at step,
        re-masked at step). Built on the trajectory's device."""
        device = self.unmask_step.device
        t = torch.arange(self.num_steps, device=device) if steps is None else steps.to(device)
        t = t.view(1, -1, 1)
        u = self.unmask_step.unsqueeze(1)
        return u >= t, u == t, u > t

    def input_codes(self, steps: torch.Tensor, mask_code: int = -1) -> torch.Tensor:
        """Image codes the sampler fed the model at the start of each step: long [B, S, N] for steps [S]."""
        steps = steps.to(self.unmask_step.device)
        committed = self.unmask_step.unsqueeze(1) < steps.view(1, -1, 1)
        codes = self.final_codes.unsqueeze(1).expand(-1, steps.numel(), -1)
        return torch.where(committed, codes, torch.full_like(codes, mask_code))

    def input_codes_at(self, samples: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The same for (sample, step) rows: long [R, N], row r the codes of sample samples[r] at step steps[r]."""
        committed = self.unmask_step[samples] < steps.view(-1, 1)
        codes = self.final_codes[samples]
        return torch.where(committed, codes, torch.full_like(codes, -1))

    def _per_row(self, fn) -> dict[str, Any]:
        """`fn` applied to every per-rollout tensor (also inside the condition dicts), as replace() arguments."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = fn(v)
            elif f.name in _CONDITIONS:
                out[f.name] = {k: fn(t) for k, t in v.items()}
        return out

    def to(self, device: torch.device | str) -> "Trajectory":
        return replace(self, **self._per_row(lambda t: t.to(device)))

    def select(self, index: torch.Tensor | slice) -> "Trajectory":
        """A sub-batch of rollouts."""
        return replace(self, **self._per_row(lambda t: t[index].contiguous()))

    @staticmethod
    def concat(parts: list["Trajectory"]) -> "Trajectory":
        """Stack rollouts of the same shape (same T, N, condition) into one batch; metadata of the first part is
        kept."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        out: dict[str, Any] = {}
        for f in fields(first):
            v = getattr(first, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = torch.cat([getattr(p, f.name) for p in parts])
            elif f.name in _CONDITIONS:
                out[f.name] = {k: torch.cat([getattr(p, f.name)[k] for p in parts]) for k in v}
        return replace(first, **out, policy_version=min(p.policy_version for p in parts))
