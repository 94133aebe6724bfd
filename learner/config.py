"""The learner's configuration: objective, advantages, step reduction, optimizer and DeepSpeed settings."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Optional

from policy.trajectory import Transition


class LossAverage(StrEnum):
    sequence = "sequence"
    token = "token"


class Reduction(StrEnum):
    all = "all"
    first_k = "first_k"
    random_k = "random_k"
    every_n = "every_n"


class Advantage(StrEnum):
    group = "group"
    running = "running"


@dataclass
class LoraSettings:
    """Low-rank adapters (peft LoRA) on the policy's linear layers; ``rank: 0`` (the default) trains every weight.

    With rank r > 0 only the adapters train (AdamW state and weight syncs cover only them), the KL reference is the
    same model with its adapters switched off, and checkpoints hold the adapters in peft's format (`learner.lora`).
    The update of a layer is ``(alpha / rank) · B·A`` (B starts at zero: the adapted model starts equal to the base).
    ``target_modules``: the linear layers adapted, by module name; empty = every layer the policy family names
    (`MaskedModel.lora_targets`, e.g. Show-o's Phi projections); names are checked against the family when the run
    config loads and when adapters are added (`learner.lora.resolve_targets`).
    """
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.target_modules = [str(m) for m in self.target_modules]
        problems = []
        if self.rank < 0:
            problems.append(f"learner.lora.rank={self.rank} is negative: use 0 (LoRA off, every weight trains) or a "
                            f"rank >= 1 (e.g. 64)")
        if self.alpha <= 0:
            problems.append(f"learner.lora.alpha={self.alpha} must be > 0 (the update is alpha/rank · B·A)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"learner.lora.dropout={self.dropout} must lie in [0, 1)")
        if problems:
            raise ValueError("\n  - ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def target_problem(self, family: str, targets: tuple[str, ...], note: str = "") -> str | None:
        """Why `target_modules` does not fit a family whose adaptable layers are `targets` (None when it does)."""
        unknown = [m for m in self.target_modules if m not in targets]
        if not unknown:
            return None
        return (f"learner.lora.target_modules {unknown} match no layer {family} adapts"
                f"{f' ({note})' if note and not set(unknown) - {'lm_head'} else ''}: choose from {list(targets)}, or "
                f"leave it empty for all of them")


class StaleLogprobs(StrEnum):
    """What the importance ratio of a stale trajectory (sampled with older weights, `cluster.max_staleness` > 0)
    is taken against. ``recompute``: the learner's own log-probs at the start of the update (the proximal policy,
    as verl and AReaL recompute "old" log-probs), one extra forward pass without gradients over the stale rows.
    ``recorded``: the behaviour log-probs the rollout worker recorded (importance weights back to the sampling
    policy); on this project's default world it stalls learning (README, "Why one-step-stale updates stalled")."""
    recompute = "recompute"
    recorded = "recorded"


@dataclass
class LearnerConfig:
    """Everything the Mask-GRPO learner needs; defaults follow the paper / the authors' release.

    Objective (per scored (trajectory, step) row, see `learner.loss`):
      ``loss_row = -min(A·r, A·clamp(r, clip_low, clip_high)) + kl_beta·k3(ref, cur)``, r = exp(cur − behaviour).

    ``loss_average``:
      - ``"sequence"`` (authors): every row is scaled by 1/T (T = the trajectory's total sampler steps, even when
        only some steps are trained), summed over the trajectory's trained steps, then averaged over the
        trajectories (kept samples) of the whole global batch, all ranks together.
      - ``"token"``: the rows' losses are summed and divided by the total number of scored positions
        (``num_terms``: kept tokens for candidate 2, still-masked positions for candidate 1 and the AR-style
        transition) in the global batch: a per-token mean, so transitions that decide many tokens weigh more.
    """
    # ----- objective ---------------------------------------------------------------------------------------
    transition: Transition = Transition.candidate1
    clip_low: float = 0.9                   # ratio clamp range [clip_low, clip_high] (authors: [0.9, 1.2])
    clip_high: float = 1.2
    kl_beta: float = 0.0                    # k3 KL to a frozen reference policy; 0 = no reference model at all
    loss_average: LossAverage = LossAverage.sequence   # see the class docstring
    # ----- which unmasking steps are trained (the sampler still runs all T) ------------------------------------
    reduction: Reduction = Reduction.all
    reduction_k: int = 25                   # first_k / random_k: how many steps (release: first 25 of 50)
    reduction_n: int = 2                    # every_n: train steps 0, n, 2n, ...
    # ----- advantages and filtering ----------------------------------------------------------------------------
    advantage: Advantage = Advantage.group  # group: (r - mean_G)/(std_G + eps); running: per-prompt history
    stale_logprobs: StaleLogprobs = StaleLogprobs.recompute   # see StaleLogprobs
    adv_eps: float = 1e-4
    adv_std_unbiased: bool = True           # torch.std's default (Bessel's correction) for the group std
    running_buffer: int = 64                # "running": how many past rewards per prompt are remembered
    running_min_count: int = 2              # "running": below this history length the group's own stats are used
    filter_min_std: float = 0.0             # drop groups whose reward std < this (0 = keep every group)
    filter_top_bottom: int = 0              # keep only the top k and bottom k samples of each group (0 = all)
    reward_name: str = "reward"             # names the reward in error messages and metrics
    # ----- optimizer and schedule ---------------------------------------------------------------------------
    lr: float = 3e-6
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    weight_decay: float = 0.02              # none on biases and 1-D tensors (LayerNorm weights)
    warmup_steps: int = 1000
    total_steps: int = 16000
    min_lr_ratio: float = 0.0               # cosine decays to lr·min_lr_ratio at total_steps
    grad_clip: float = 1.0                  # global gradient-norm clip (0 = off)
    # ----- execution -------------------------------------------------------------------------------------------
    zero_stage: int = 0                     # DeepSpeed ZeRO stage 0..3
    micro_batch_rows: int = 64              # (trajectory, step) rows per forward/backward; 0 = from free GPU memory
    gradient_checkpointing: Optional[bool] = False  # None = on when too few rows fit without it (learner.memory)
    bf16: Optional[bool] = None             # None = auto: on with CUDA, off on the CPU
    prefix_reuse: bool = True               # encode each trajectory's text prefix once per micro-batch
    max_consecutive_nonfinite: int = 3      # this many skipped (NaN/inf) updates in a row raise an error
    seed: int = 0
    extra_deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config
    lora: LoraSettings = field(default_factory=LoraSettings)      # rank 0: full fine-tuning (see LoraSettings)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        problems = []
        for name, kind in (("transition", Transition), ("loss_average", LossAverage), ("reduction", Reduction),
                           ("advantage", Advantage), ("stale_logprobs", StaleLogprobs)):
            try:
                setattr(self, name, kind(getattr(self, name)))
            except ValueError:
                problems.append(f"learner.{name} must be one of {[k.value for k in kind]}, not {getattr(self, name)!r}")
        checks = [
            (0.0 < self.clip_low <= 1.0 <= self.clip_high, "need 0 < learner.clip_low <= 1 <= learner.clip_high"),
            (self.kl_beta >= 0.0, "learner.kl_beta must be >= 0"),
            (self.reduction_k >= 1 and self.reduction_n >= 1, "learner.reduction_k and reduction_n must be >= 1"),
            (self.adv_eps > 0.0, "learner.adv_eps must be > 0"),
            (self.filter_min_std >= 0.0 and self.filter_top_bottom >= 0, "learner filters must be >= 0"),
            (math.isfinite(self.lr) and self.lr > 0.0,
             f"learner.lr must be a finite number > 0, not {self.lr!r} (an infinite step ruins every weight)"),
            (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "learner.betas needs two values in [0, 1)"),
            (math.isfinite(self.adam_eps) and self.adam_eps > 0.0, "learner.adam_eps must be a finite number > 0"),
            (all(math.isfinite(v) and v >= 0.0 for v in (self.weight_decay, self.grad_clip, self.kl_beta)),
             "learner.weight_decay, grad_clip and kl_beta must be finite numbers >= 0"),
            (self.zero_stage in (0, 1, 2, 3), "learner.zero_stage must be 0, 1, 2 or 3"),
            (self.micro_batch_rows >= 0, "learner.micro_batch_rows must be >= 1, or 0 for auto (free GPU memory)"),
            (self.warmup_steps >= 0 and self.total_steps >= 1, "learner.warmup_steps >= 0 and total_steps >= 1"),
            (0.0 <= self.min_lr_ratio <= 1.0, "learner.min_lr_ratio must lie in [0, 1]"),
            (self.max_consecutive_nonfinite >= 1, "learner.max_consecutive_nonfinite must be >= 1"),
            (self.running_buffer >= 1 and self.running_min_count >= 1,
             "learner.running_buffer and running_min_count must be >= 1"),
        ]
        problems += [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (enums as strings), for checkpoints."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return {k: str(v) if isinstance(v, StrEnum) else v for k, v in d.items()}
