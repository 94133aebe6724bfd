"""Batched MaskGIT-style unmasking for any policy family (`policy.family`) that records Mask-GRPO trajectories.

All prompts and all G samples of each group advance together: one forward pass per step for the whole batch
(two halves, cond and uncond, when classifier-free guidance is on). What the condition alone determines is
computed once per rollout call, as the model's context (Show-o: the text prefix's keys/values, written once into
preallocated per-layer buffers that every step's image keys/values are written after, so no step concatenates the
prefix again; Meissonic: the text embeddings).

Randomness is per sample: each row draws its uniforms for all steps from its own seeded generator up front, so a
sample is the same whether it is drawn alone or in a batch (tokens by inverse-CDF sampling, re-masking by
Gumbel-perturbed confidence), and the same on any device. The uniforms are drawn on the CPU (seeded CPU
generators are what makes them device-independent) and copied to the device once per rollout.

Schedule (as MaskGIT/Show-o): after step t (0-based) ``floor(N·γ((t+1)/T))`` positions stay masked, at least 1
and at most (still masked − 1), except that the last step commits every remaining position (the reference keeps
one position masked at its last step yet emits its sample; we commit it so that every emitted token is a scored
decision; Meissonic's release does the same). The re-masking temperature is annealed to 0 by the family's rule
(`MaskedModel.remask_temperature`; Show-o: ``temperature·(1 − (t+1)/T)``, Meissonic: ``linspace(temperature, 0,
T)[t]``).

The step loop never reads a device tensor back to the host; each step holds one fp32 [B, N, C] tensor (the
log-probabilities, `policy.transition`), from which the sampled codes, their log-probs, the threshold and the
re-masked positions' below-threshold mass are all read, and the step's self-certainty (the mean over the
still-masked positions of Σ_c p_c log p_c, recorded per step in `Trajectory.self_certainty`). With
classifier-free guidance, p is the guided distribution ``softmax((1+w)·cond − w·uncond)`` (w: the family's
`guidance_weight` of the configured scale): the one the codes are actually drawn from.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Optional, Sequence

import torch

from .family import Condition, MaskedModel, condition_rows, condition_to, repeat_rows
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
    temperature: float = 1.0        # Gumbel noise on the re-masking confidence, annealed to 0 (the family's rule)
    guidance_scale: float = 0.0     # classifier-free guidance, in the family's scale (Show-o: 0 = off, as the
                                    # paper trains; Meissonic: <= 1 = off, its release samples at 9)
    negative_prompt: str = ""       # what guidance contrasts with ("" = the null prompt)
    prefix_reuse: bool = True       # reuse what the condition alone determines (Show-o's text prefix) across steps

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"sampler.schedule: unknown mask schedule {self.schedule!r}; choose one of "
                             f"{sorted(SCHEDULES)}")
        self.schedule = Schedule(self.schedule)
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1 (unmasking steps per image), not {self.steps}")


def _float32_gamma(schedule: str) -> Callable[[float], float]:
    """gamma evaluated as Meissonic's scheduler does, in float32 torch arithmetic: at r = 1/3 of a cosine schedule
    N·cos(π/6·...) lands a last bit below an integer (e.g. 64·cos(π/3) = 31.99999 in float32, 32 in float64)."""
    def gamma(r: float) -> float:
        ratio = torch.tensor(r, dtype=torch.float32)
        value = torch.cos(ratio * math.pi / 2) if schedule == Schedule.cosine else (1.0 - ratio).clamp(1e-6, 1.0)
        return value
    return gamma


def masked_counts(num_tokens: int, steps: int, schedule: str = "cosine", precision: str = "float64") -> list[int]:
    """How many positions are still masked after each step (length T; the last entry is 0). `precision`: the
    family's arithmetic for N·γ (`MaskedModel.schedule_precision`): float64 (Show-o's) or float32 (Meissonic's)."""
    gamma = SCHEDULES[schedule] if precision == "float64" else _float32_gamma(schedule)
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
    """Runs batched unmasking rollouts of a policy model and returns `Trajectory` records."""

    def __init__(self, model: MaskedModel, config: SamplerConfig):
        self.model = model
        self.config = config

    @torch.no_grad()
    def sample(self, condition: Condition, seeds: Sequence[int], group_size: int = 1,
               null_condition: Optional[Condition] = None,
               on_step: Optional[Callable[[int], None]] = None) -> Trajectory:
        """Roll out `group_size` samples for each of the P prompts of `condition` (P rows); `seeds` has P·G
        entries (row p·G + g is sample g of prompt p). `null_condition` (one row) is what guidance contrasts
        with; needed when the configured guidance is on."""
        cfg, model = self.config, self.model
        device = next(model.parameters()).device
        n, steps = model.num_tokens, cfg.steps
        b = condition_rows(condition) * group_size
        if len(seeds) != b:
            raise ValueError(f"need one seed per sample: {b} samples, {len(seeds)} seeds")
        t0 = time.perf_counter()
        weight = model.guidance_weight(cfg.guidance_scale)
        cfg_on = weight != 0.0
        if cfg_on and null_condition is None:
            raise ValueError(f"sampler.guidance_scale={cfg.guidance_scale:g} needs the null condition "
                             f"(Policy.null_condition())")
        condition = condition_to(condition, device)
        parts = [(condition, group_size)]
        if cfg_on:
            null_condition = condition_to(null_condition, device)
            parts.append((null_condition, b))
        context = model.context(parts, inference=True, reuse=cfg.prefix_reuse)

        u = _uniforms(seeds, steps, n, device)
        counts = masked_counts(n, steps, cfg.schedule, model.schedule_precision)
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
            logits = model.logits(context, torch.cat([codes, codes]) if cfg_on else codes, t, steps)
            logprobs = (codebook_logprobs(*logits.chunk(2), weight) if cfg_on
                        else codebook_logprobs(logits))                       # fp32 [B, N, C]
            del logits
            # self-certainty: mean over the still-masked positions of Σ_c p log p of the distribution sampled
            certainty[:, t] = (neg_entropy(logprobs) * unknown).sum(-1) / unknown.sum(-1).clamp(min=1)
            drawn = sample_codes(logprobs, u[:, t, 0])
            drawn = torch.where(unknown, drawn, torch.full_like(drawn, -1))
            logp = code_logprob(logprobs, drawn)
            # Re-mask the least confident samples: confidence = log p + annealed Gumbel noise; committed = +inf.
            temp = model.remask_temperature(cfg.temperature, t, steps)
            gumbel = -torch.log((-torch.log(u[:, t, 1].clamp(1e-20, 1.0))).clamp(min=1e-20))
            keep_masked = counts[t]
            remask, order = remask_positions(logp, unknown, gumbel, temp, keep_masked)
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
        cpu = lambda c: {k: v.cpu() for k, v in c.items()}        # noqa: E731
        null_rows = cpu(repeat_rows(null_condition, b)) if cfg_on else {}
        return Trajectory(condition=cpu(repeat_rows(condition, group_size)), null_condition=null_rows,
                          unmask_step=unmask_step.cpu(), sampled_codes=sampled_codes.cpu(),
                          token_logprob=token_logprob.cpu(), remask_logprob=remask_logprob.cpu(),
                          threshold=threshold.cpu(), final_codes=codes.cpu(), self_certainty=certainty.cpu(),
                          guidance_weight=weight,
                          meta={"sample_seconds": time.perf_counter() - t0, "seeds": list(map(int, seeds))})


def remask_positions(logp: torch.Tensor, unknown: torch.Tensor, gumbel: torch.Tensor, temperature: float,
                     keep_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unmasking rule of one step (MaskGIT's, as Show-o's and Meissonic's releases): the `keep_masked`
    still-masked positions of lowest confidence ``log p(drawn code) + temperature·gumbel`` are masked again;
    committed positions have infinite confidence. Returns (bool [B, N] re-masked, the confidence order [B, N])."""
    confidence = torch.where(unknown, logp + temperature * gumbel, torch.full_like(logp, math.inf))
    order = confidence.argsort(dim=-1)
    remask = torch.zeros_like(unknown)
    remask[torch.arange(logp.shape[0], device=logp.device).unsqueeze(1), order[:, :keep_masked]] = True
    return remask, order
