"""Batched MaskGIT-style unmasking for Show-o that records Mask-GRPO trajectories.

All prompts and all G samples of each group advance together: one forward pass per step for the whole batch
(two halves, cond and uncond, when classifier-free guidance is on). The text prefix's keys/values are computed
once per prompt and written once into preallocated per-layer buffers that every step's image keys/values are
written after (text tokens never attend to image tokens), so no step concatenates the prefix again.

Randomness is per sample: each row draws its uniforms for all steps from its own seeded generator up front, so a
sample is the same whether it is drawn alone or in a batch (tokens by inverse-CDF sampling, re-masking by
Gumbel-perturbed confidence), and the same on any device. The uniforms are drawn on the CPU (seeded CPU
generators are what makes them device-independent) and copied to the device once per rollout.

Schedule (as MaskGIT/Show-o): after step t (0-based) ``floor(N·γ((t+1)/T))`` positions stay masked, at least 1
and at most (still masked − 1), except that the last step commits every remaining position (the reference keeps
one position masked at its last step yet emits its sample; we commit it so that every emitted token is a scored
decision). The re-masking temperature is annealed linearly, ``temperature·(1 − (t+1)/T)`` (the reference compounds
the factor from step to step; MaskGIT and this sampler do not).

The step loop never reads a device tensor back to the host; each step holds one fp32 [B, N, C] tensor (the
log-probabilities, `policy.transition`), from which the sampled codes, their log-probs, the threshold and the
re-masked positions' below-threshold mass are all read, and the step's self-certainty (the mean over the
still-masked positions of Σ_c p_c log p_c, recorded per step in `Trajectory.self_certainty`). With
classifier-free guidance, p is the guided distribution ``softmax((1+s)·cond − s·uncond)``: the one the codes are
actually drawn from.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Optional, Sequence

import torch

from .showo import PrefixCache, Showo
from .trajectory import Trajectory
from .transition import code_logprob, codebook_logprobs, neg_entropy, remask_log_mass, sample_codes

class Schedule(StrEnum):
    """How many positions stay masked after each step: N·γ((t+1)/T)."""
    cosine = "cosine"
    linear = "linear"


# gamma(r): the share of positions still masked after a fraction r of the steps. Plain float arithmetic (no
# tensors, so no device and no host read): math.cos gives the same floor(N·gamma) as the float64 torch.cos used
# before for every square N <= 4096 and T <= 100 (checked), and cos(pi/3) = 1/2 is the only rational value
# cos takes at r in (0, 1) (Niven), the one place where a last-bit difference could move the floor.
SCHEDULES: dict[str, Callable[[float], float]] = {
    Schedule.cosine: lambda r: math.cos(r * math.pi * 0.5),
    Schedule.linear: lambda r: min(max(1.0 - r, 1e-6), 1.0),
}


@dataclass
class SamplerConfig:
    steps: int = 50
    schedule: Schedule = Schedule.cosine
    temperature: float = 1.0        # Gumbel noise on the re-masking confidence, annealed to 0
    guidance_scale: float = 0.0     # classifier-free guidance (0 while training, as the paper)
    prefix_reuse: bool = True       # reuse the text prefix's keys/values across steps

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"sampler.schedule: unknown mask schedule {self.schedule!r}; choose one of "
                             f"{sorted(SCHEDULES)}")
        self.schedule = Schedule(self.schedule)
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1 (unmasking steps per image), not {self.steps}")


def masked_counts(num_tokens: int, steps: int, schedule: str = "cosine") -> list[int]:
    """How many positions are still masked after each step (length T; the last entry is 0)."""
    gamma = SCHEDULES[schedule]
    counts, unknown = [], num_tokens
    for t in range(steps):
        if t == steps - 1:
            keep_masked = 0
        else:
            target = int(math.floor(num_tokens * gamma((t + 1) / steps)))
            keep_masked = max(1, min(unknown - 1, target)) if unknown > 1 else 0
        counts.append(keep_masked)
        unknown = keep_masked
    return counts


def _uniforms(seeds: Sequence[int], steps: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Float [B, T, 2, N]: per sample, the token-sampling and re-masking uniforms of every step."""
    out = torch.empty(len(seeds), steps, 2, num_tokens)
    for i, seed in enumerate(seeds):
        out[i] = torch.rand(steps, 2, num_tokens, generator=torch.Generator().manual_seed(int(seed)))
    return out.to(device)


class UnmaskingSampler:
    """Runs batched unmasking rollouts of a Show-o policy and returns `Trajectory` records."""

    def __init__(self, model: Showo, config: SamplerConfig):
        self.model = model
        self.config = config
        self.layout = model.layout

    def _logits(self, text_area: torch.Tensor, prefix: Optional[PrefixCache], codes: torch.Tensor) -> torch.Tensor:
        if prefix is not None:
            return self.model.image_logits(prefix, codes)
        return self.model.image_logits_full(text_area, codes)

    @torch.no_grad()
    def sample(self, text_area: torch.Tensor, seeds: Sequence[int], group_size: int = 1,
               on_step: Optional[Callable[[int], None]] = None) -> Trajectory:
        """Roll out `group_size` samples for each prompt's text area [P, L]; `seeds` has P·G entries
        (row p·G + g is sample g of prompt p)."""
        cfg, layout, model = self.config, self.layout, self.model
        device = next(model.parameters()).device
        n, steps = layout.num_vq_tokens, cfg.steps
        b = text_area.shape[0] * group_size
        if len(seeds) != b:
            raise ValueError(f"need one seed per sample: {b} samples, {len(seeds)} seeds")
        t0 = time.perf_counter()
        text_area = text_area.to(device).repeat_interleave(group_size, 0)
        uncond = layout.empty_text_area(b).to(device)
        cfg_on = cfg.guidance_scale != 0.0
        both_text = torch.cat([text_area, uncond]) if cfg_on else text_area
        prefix = None
        if cfg.prefix_reuse:
            parts = [(model.encode_text(text_area[::group_size]), group_size)]
            if cfg_on:
                parts.append((model.encode_text(uncond[:1]), b))
            prefix = model.prefix_cache(*parts)
            del parts

        u = _uniforms(seeds, steps, n, device)
        counts = masked_counts(n, steps, cfg.schedule)
        codes = torch.full((b, n), -1, dtype=torch.long, device=device)
        unmask_step = torch.full((b, n), steps, dtype=torch.long, device=device)
        sampled_codes = torch.full((b, steps, n), -1, dtype=torch.long, device=device)
        token_logprob = torch.zeros(b, steps, n, device=device)
        remask_logprob = torch.zeros(b, steps, n, device=device)
        threshold = torch.zeros(b, steps, device=device)
        certainty = torch.zeros(b, steps, device=device)
        rows = torch.arange(b, device=device)
        for t in range(steps):
            unknown = codes < 0
            logits = self._logits(both_text, prefix, torch.cat([codes, codes]) if cfg_on else codes)
            logprobs = (codebook_logprobs(*logits.chunk(2), cfg.guidance_scale) if cfg_on
                        else codebook_logprobs(logits))                       # fp32 [B, N, C]
            del logits
            # self-certainty: mean over the still-masked positions of Σ_c p log p of the distribution sampled
            certainty[:, t] = (neg_entropy(logprobs) * unknown).sum(-1) / unknown.sum(-1).clamp(min=1)
            drawn = sample_codes(logprobs, u[:, t, 0])
            drawn = torch.where(unknown, drawn, torch.full_like(drawn, -1))
            logp = code_logprob(logprobs, drawn)
            # Re-mask the least confident samples: confidence = log p + annealed Gumbel noise; committed = +inf.
            temp = cfg.temperature * (1.0 - (t + 1) / steps)
            gumbel = -torch.log((-torch.log(u[:, t, 1].clamp(1e-20, 1.0))).clamp(min=1e-20))
            confidence = torch.where(unknown, logp + temp * gumbel, torch.full_like(logp, math.inf))
            order = confidence.argsort(dim=-1)
            keep_masked = counts[t]
            remask = torch.zeros_like(unknown)
            remask[rows.unsqueeze(1), order[:, :keep_masked]] = True
            kept = unknown & ~remask
            # the threshold: probability of the least confident kept sample (as the learner reads it back)
            thr = logp[rows, order[:, keep_masked]].exp()

            sampled_codes[:, t] = drawn
            token_logprob[:, t] = logp
            threshold[:, t] = thr
            if keep_masked:
                remask_logprob[:, t] = torch.where(remask, remask_log_mass(logprobs, thr), 0.0)
            del logprobs
            codes = torch.where(kept, drawn, codes)
            unmask_step = torch.where(kept, torch.full_like(unmask_step, t), unmask_step)
            if on_step is not None:
                on_step(t)
        return Trajectory(text_ids=text_area.cpu(), uncond_text_ids=uncond.cpu(), unmask_step=unmask_step.cpu(),
                          sampled_codes=sampled_codes.cpu(), token_logprob=token_logprob.cpu(),
                          remask_logprob=remask_logprob.cpu(), threshold=threshold.cpu(), final_codes=codes.cpu(),
                          self_certainty=certainty.cpu(), guidance_scale=cfg.guidance_scale,
                          meta={"sample_seconds": time.perf_counter() - t0, "seeds": list(map(int, seeds))})
