"""What crosses between the driver and a learner rank for one update: the work of each group, and the figures
the rank reports back (sums, so that the driver can merge any number of ranks)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import torch


@dataclass
class GroupUpdate:
    """One group's share of an update, decided by the driver (`algorithm.plan.Planner`): which (sample, step) rows
    train and their advantages."""
    trajectory: Any                 # the group's `Trajectory` (an object reference until the rank fetches it)
    advantages: torch.Tensor        # float32 [G] (one per sample, every step) or [G, T] (one per row)
    train: torch.Tensor             # bool [G, T]: the rows that train
    group_id: int = 0
    behaviour_logprob: Optional[torch.Tensor] = None   # float [G, T]: replaces the recorded behaviour log-probs

    @staticmethod
    def rectangle(trajectory: Any, advantages: torch.Tensor, keep: torch.Tensor, steps: torch.Tensor,
                  num_steps: int, **kw: Any) -> "GroupUpdate":
        """The kept samples at the given steps (the paper's update: every kept sample trains the same steps)."""
        train = torch.zeros(keep.numel(), num_steps, dtype=torch.bool)
        train[keep.nonzero().flatten().unsqueeze(1), torch.as_tensor(steps, dtype=torch.long)] = True
        return GroupUpdate(trajectory, advantages, train, **kw)

    def without_trajectory(self) -> "GroupUpdate":
        """This update with its trajectory left out (it travels beside it, as a call's top-level argument)."""
        return replace(self, trajectory=None)


@dataclass
class UpdateStats:
    """A rank's figures for one update. Sums over its rows (one row = one trajectory at one trained step), so
    that `merge` over ranks gives the global figures; `on_policy_dev` holds |ratio − 1| of the rows whose
    trajectory was sampled with the weights being trained (staleness 0), which must be ≈ 0: rollout and
    learner compute the same log-probs."""
    rows: float = 0.0
    loss: float = 0.0
    clipped: float = 0.0
    ratio_sum: float = 0.0
    ratio_max: float = 0.0
    approx_kl_sum: float = 0.0
    kl_sum: float = 0.0
    stale_sum: float = 0.0
    on_policy_dev: list[float] = field(default_factory=list)
    on_policy_outside_clip: float = 0.0
    stale_rows: float = 0.0             # rows whose ratio was taken against recomputed (proximal) log-probs
    stale_behaviour_kl: float = 0.0     # Σ k3 KL(behaviour ‖ proximal) over those rows: how far the weights moved
    learner_tokens: float = 0.0         # image-token positions through the learner's forward passes (recomputations,
                                        # the KL reference's and padding passes included; a guided one counts twice)
    micro_batches: float = 0.0
    micro_batch_rows: float = 0.0       # the rank's plan (learner.memory); merged: the smallest
    checkpointing: bool = False         # merged: on for any rank
    # the same on every rank
    grad_norm: float = 0.0
    lr: float = 0.0
    version: int = 0
    nonfinite_skipped: bool = False
    no_signal_skipped: bool = False
    nonfinite_total: int = 0
    has_reference: bool = False
    seconds_forward_backward: float = 0.0
    seconds_step: float = 0.0
    started: float = 0.0                # wall-clock span of the update on this rank (the run's timeline)
    finished: float = 0.0

    _SUMMED = ("rows", "loss", "clipped", "ratio_sum", "approx_kl_sum", "kl_sum", "stale_sum", "on_policy_outside_clip",
               "stale_rows", "stale_behaviour_kl", "micro_batches", "learner_tokens")

    @staticmethod
    def merge(parts: list["UpdateStats"]) -> "UpdateStats":
        """The global figures of one update from every rank's own."""
        out = UpdateStats(**{f.name: getattr(parts[0], f.name) for f in fields(UpdateStats)})
        for k in UpdateStats._SUMMED:
            setattr(out, k, sum(getattr(p, k) for p in parts))
        out.micro_batches = max(p.micro_batches for p in parts)
        out.micro_batch_rows = min(p.micro_batch_rows for p in parts)
        out.checkpointing = any(p.checkpointing for p in parts)
        out.ratio_max = max(p.ratio_max for p in parts)
        out.on_policy_dev = [d for p in parts for d in p.on_policy_dev]
        for k in ("seconds_forward_backward", "seconds_step"):
            setattr(out, k, max(getattr(p, k) for p in parts))
        out.started, out.finished = min(p.started for p in parts), max(p.finished for p in parts)
        return out

    def metrics(self) -> dict[str, float]:
        """The figures a GRPO user watches (metrics.jsonl keys, without the `learner/` prefix)."""
        rows = max(self.rows, 1.0)
        n_on = len(self.on_policy_dev)
        out = {"loss": self.loss, "rows": self.rows, "clip_frac": self.clipped / rows,
               "ratio_mean": self.ratio_sum / rows, "ratio_max": self.ratio_max, "approx_kl": self.approx_kl_sum / rows,
               "staleness_mean": self.stale_sum / rows, "grad_norm": self.grad_norm, "lr": self.lr,
               "version": float(self.version), "micro_batches": self.micro_batches,
               "micro_batch_rows": self.micro_batch_rows, "checkpointing": float(self.checkpointing),
               "nonfinite_skipped": float(self.nonfinite_skipped), "nonfinite_total": float(self.nonfinite_total),
               "no_signal_skipped": float(self.no_signal_skipped),
               "seconds_forward_backward": self.seconds_forward_backward, "seconds_step": self.seconds_step,
               "on_policy_rows": float(n_on),
               "on_policy_ratio_dev": statistics.median(self.on_policy_dev) if n_on else float("nan"),
               "on_policy_outside_clip": self.on_policy_outside_clip / n_on if n_on else float("nan"),
               "stale_rows": self.stale_rows,
               "stale_behaviour_kl": self.stale_behaviour_kl / self.stale_rows if self.stale_rows else 0.0}
        if self.has_reference:
            out["kl"] = self.kl_sum / rows
        return out

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
