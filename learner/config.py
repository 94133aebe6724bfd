"""The learner's configuration: the optimizer and how the update is executed (DeepSpeed, micro-batches, LoRA).
What the update computes (transition, loss, credit, which rows) is the `algorithm` section (`algorithm.config`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


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


@dataclass
class LearnerConfig:
    """The learner's optimizer and execution; defaults follow the paper / the authors' release."""
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
    extra_deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config
    lora: LoraSettings = field(default_factory=LoraSettings)      # rank 0: full fine-tuning (see LoraSettings)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        checks = [
            (math.isfinite(self.lr) and self.lr > 0.0,
             f"learner.lr must be a finite number > 0, not {self.lr!r} (an infinite step ruins every weight)"),
            (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "learner.betas needs two values in [0, 1)"),
            (math.isfinite(self.adam_eps) and self.adam_eps > 0.0, "learner.adam_eps must be a finite number > 0"),
            (all(math.isfinite(v) and v >= 0.0 for v in (self.weight_decay, self.grad_clip)),
             "learner.weight_decay and grad_clip must be finite numbers >= 0"),
            (self.zero_stage in (0, 1, 2, 3), "learner.zero_stage must be 0, 1, 2 or 3"),
            (self.micro_batch_rows >= 0, "learner.micro_batch_rows must be >= 1, or 0 for auto (free GPU memory)"),
            (self.warmup_steps >= 0 and self.total_steps >= 1, "learner.warmup_steps >= 0 and total_steps >= 1"),
            (0.0 <= self.min_lr_ratio <= 1.0, "learner.min_lr_ratio must lie in [0, 1]"),
            (self.max_consecutive_nonfinite >= 1, "learner.max_consecutive_nonfinite must be >= 1"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, for checkpoints."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d
