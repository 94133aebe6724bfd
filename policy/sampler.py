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
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Callable, Optional, Sequence

import torch

from .family import Condition, MaskedModel, condition_to, repeat_rows
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


@dataclass
class SamplerState:
    """A batch of rollouts part-way through the schedule: the codes so far and the record of the steps taken.

    Rows are prompt-major: each of the P prompts (`prompts`, their condition) has `per_prompt` consecutive rows.
    A state can be handed back at any step (`UnmaskingSampler.run(state, until=k)`), branched (`branch`: each row
    continued by several rows, each with its own seed) and continued from there; `UnmaskingSampler.finish` turns
    it into the `Trajectory` of its rows (the steps before a branch appear in every branch's record)."""
    prompts: Condition                 # P rows, on the sampler's device
    per_prompt: int                    # rows per prompt
    null: Optional[Condition]          # one row (guidance on) or None
    seeds: list[int]                   # per row: the seed of its generator (the uniforms of the steps it runs)
    codes: torch.Tensor                # long [B, N], -1 where masked
    unmask_step: torch.Tensor          # long [B, N]
    sampled_codes: torch.Tensor        # long [B, T, N]
    token_logprob: torch.Tensor        # float [B, T, N]
    remask_logprob: torch.Tensor       # float [B, T, N]
    threshold: torch.Tensor            # float [B, T]
    certainty: torch.Tensor            # float [B, T]
    step: int = 0                      # the next step to run
    rollout_tokens: float = 0.0        # image-token positions the model evaluated (a guided step counts twice)

    @property
    def rows(self) -> int:
        return len(self.seeds)

    @property
    def num_steps(self) -> int:
        return int(self.sampled_codes.shape[1])

    def branch(self, factor: int, seeds: Sequence[int]) -> "SamplerState":
        """Each row continued by `factor` rows (consecutive), the new rows seeded by `seeds` (one per new row)."""
        if len(seeds) != self.rows * factor:
            raise ValueError(f"branching {self.rows} rows {factor} times needs {self.rows * factor} seeds, got "
                             f"{len(seeds)}")
        rep = {f.name: getattr(self, f.name).repeat_interleave(factor, 0) for f in fields(self)
               if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, per_prompt=self.per_prompt * factor, seeds=[int(x) for x in seeds], **rep)


class UnmaskingSampler:
    """Runs batched unmasking rollouts of a policy model and returns `Trajectory` records."""

    def __init__(self, model: MaskedModel, config: SamplerConfig):
        self.model = model
        self.config = config

    @torch.no_grad()
    def sample(self, condition: Condition, seeds: Sequence[int], group_size: int = 1,
               null_condition: Optional[Condition] = None,
               on_step: Optional[Callable[[int], None]] = None, tree=None) -> Trajectory:
        """Roll out `group_size` samples for each of the P prompts of `condition` (P rows); `seeds` has P·G
        entries (row p·G + g is sample g of prompt p). `null_condition` (one row) is what guidance contrasts
        with; needed when the configured guidance is on.

        With a group `tree` (`algorithm.tree.TreeSpec`: leaves = `group_size`), each prompt's group is sampled as
        a tree: one root for the steps before the first branch step, branching there, ... (`seeds`: each prompt's
        `tree.num_nodes` node seeds, root first, depth by depth); the steps before a branch are computed once."""
        p = next(iter(condition.values())).shape[0]
        t0 = time.perf_counter()
        if tree is None:
            if len(seeds) != p * group_size:
                raise ValueError(f"need one seed per sample: {p * group_size} samples, {len(seeds)} seeds")
            state = self.run(self.start(condition, seeds, group_size, null_condition), on_step=on_step)
        else:
            n = tree.num_nodes
            if tree.leaves != group_size or len(seeds) != p * n:
                raise ValueError(f"a tree of {tree.leaves} leaves for groups of {group_size}, {n} seeds per prompt: "
                                 f"got {len(seeds)} seeds for {p} prompts")
            per = [list(seeds[i * n:(i + 1) * n]) for i in range(p)]
            state = self.start(condition, [s[0] for s in per], 1, null_condition)
            for depth, (k, f) in enumerate(zip(tree.branch_steps, tree.factors), start=1):
                state = self.run(state, until=k, on_step=on_step)
                state = state.branch(f, [x for s in per for x in tree.node_seeds(s, depth)])
            state = self.run(state, on_step=on_step)
        traj = self.finish(state)
        traj.meta["sample_seconds"] = time.perf_counter() - t0
        return traj

    def start(self, condition: Condition, seeds: Sequence[int], per_prompt: int = 1,
              null_condition: Optional[Condition] = None) -> SamplerState:
        """Every row all masked, at step 0: `per_prompt` rows for each prompt of `condition` (P rows), one seed
        per row. (A state part-way comes from `run(state, until=k)`; its codes may also be set by the caller.)"""
        model = self.model
        device = next(model.parameters()).device
        n, steps = model.num_tokens, self.config.steps
        weight = model.guidance_weight(self.config.guidance_scale)
        if weight != 0.0 and null_condition is None:
            raise ValueError(f"sampler.guidance_scale={self.config.guidance_scale:g} needs the null condition "
                             f"(Policy.null_condition())")
        b = len(seeds)
        if b != next(iter(condition.values())).shape[0] * per_prompt:
            raise ValueError(f"need one seed per row: {b} seeds for {per_prompt} rows of each prompt")
        return SamplerState(
            prompts=condition_to(condition, device), per_prompt=per_prompt,
            null=condition_to(null_condition, device) if weight != 0.0 else None, seeds=[int(x) for x in seeds],
            codes=torch.full((b, n), -1, dtype=torch.long, device=device),
            unmask_step=torch.full((b, n), steps, dtype=torch.long, device=device),
            sampled_codes=torch.full((b, steps, n), -1, dtype=torch.long, device=device),
            token_logprob=torch.zeros(b, steps, n, device=device),
            remask_logprob=torch.zeros(b, steps, n, device=device),
            threshold=torch.zeros(b, steps, device=device), certainty=torch.zeros(b, steps, device=device))

    @torch.no_grad()
    def run(self, state: SamplerState, until: Optional[int] = None,
            on_step: Optional[Callable[[int], None]] = None) -> SamplerState:
        """Run the steps ``[state.step, until)`` (default: to the end of the schedule); returns the state there
        (the given one, updated in place)."""
        cfg, model = self.config, self.model
        steps, n = state.num_steps, model.num_tokens
        until = steps if until is None else until
        if not state.step <= until <= steps:
            raise ValueError(f"cannot run from step {state.step} to {until} of a {steps}-step schedule")
        if until == state.step:
            return state
        weight = model.guidance_weight(cfg.guidance_scale)
        cfg_on = weight != 0.0
        b = state.rows
        parts = [(state.prompts, state.per_prompt)] + ([(state.null, b)] if cfg_on else [])
        context = model.context(parts, inference=True, reuse=cfg.prefix_reuse)
        u = _uniforms(state.seeds, steps, n, state.codes.device)
        counts = masked_counts(n, steps, cfg.schedule, model.schedule_precision)
        rows = torch.arange(b, device=state.codes.device)
        codes, unmask_step = state.codes, state.unmask_step
        for t in range(state.step, until):
            unknown = codes < 0
            logits = model.logits(context, torch.cat([codes, codes]) if cfg_on else codes, t, steps)
            logprobs = (codebook_logprobs(*logits.chunk(2), weight) if cfg_on
                        else codebook_logprobs(logits))                       # fp32 [B, N, C]
            del logits
            # self-certainty: mean over the still-masked positions of Σ_c p log p of the distribution sampled
            state.certainty[:, t] = (neg_entropy(logprobs) * unknown).sum(-1) / unknown.sum(-1).clamp(min=1)
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

            state.sampled_codes[:, t] = drawn
            state.token_logprob[:, t] = logp
            state.threshold[:, t] = thr
            if keep_masked:
                state.remask_logprob[:, t] = torch.where(remask, remask_log_mass(logprobs, thr), 0.0)
            del logprobs
            codes = torch.where(kept, drawn, codes)
            unmask_step = torch.where(kept, torch.full_like(unmask_step, t), unmask_step)
            state.rollout_tokens += b * n * (2 if cfg_on else 1)
            if on_step is not None:
                on_step(t)
        state.codes, state.unmask_step, state.step = codes, unmask_step, until
        return state

    def finish(self, state: SamplerState) -> Trajectory:
        """The record of a state's rows (CPU tensors): a `Trajectory` (its steps after `state.step` unrun)."""
        cpu = lambda c: {k: v.cpu() for k, v in c.items()}        # noqa: E731
        weight = self.model.guidance_weight(self.config.guidance_scale)
        return Trajectory(condition=cpu(repeat_rows(state.prompts, state.per_prompt)),
                          null_condition=cpu(repeat_rows(state.null, state.rows)) if weight != 0.0 else {},
                          unmask_step=state.unmask_step.cpu(), sampled_codes=state.sampled_codes.cpu(),
                          token_logprob=state.token_logprob.cpu(), remask_logprob=state.remask_logprob.cpu(),
                          threshold=state.threshold.cpu(), final_codes=state.codes.cpu(),
                          self_certainty=state.certainty.cpu(), guidance_weight=weight,
                          meta={"seeds": list(state.seeds), "rollout_tokens": state.rollout_tokens})


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
