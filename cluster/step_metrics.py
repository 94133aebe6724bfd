"""One training step's figures: what `Trainer.train_step` returns and `metrics.jsonl` holds (one line a step)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from learner.update import UpdateStats

from .weight_handover import SyncStats


def span_seconds(spans: Sequence[tuple[float, float]]) -> float:
    """Wall seconds covered by a step's (start, end) spans of one role (0 when there are none)."""
    spans = sorted(set(spans))
    return max((e for _, e in spans), default=0.0) - min((s for s, _ in spans), default=0.0)


@dataclass
class StepMetrics:
    step: int
    version: int
    group_size: int
    rewards: list[torch.Tensor]                    # [G] per trained group
    components: dict[str, list[torch.Tensor]]      # reward label -> [G] per trained group
    update: UpdateStats
    plan: dict[str, float]                         # the driver's plan: kept/dropped groups, |advantage|
    staleness: list[int]                           # per trained group: learner version - sampling version
    rollout_spans: list[tuple[float, float]]
    reward_spans: list[tuple[float, float]]
    wait_seconds: float                            # the driver waiting for rollouts and their rewards
    learner_seconds: float
    sync: SyncStats
    reissued: int
    stale_dropped: int
    step_seconds: float = 0.0
    rollout_workers: int = 0                       # workers in service at the end of the step (elastic fleet)
    rollout_tokens: float = 0.0                    # image-token positions the rollout model evaluated for the step
    extra: dict[str, Any] = field(default_factory=dict)   # added by the train loop (eval_overall, checkpoint)

    def to_json(self) -> dict[str, Any]:
        """The metrics.jsonl record (its keys are read by scripts outside the repository: keep them)."""
        all_r = torch.cat(self.rewards) if self.rewards else torch.zeros(0)
        stale = np.asarray(self.staleness, dtype=np.int64)
        values, counts = np.unique(stale, return_counts=True)
        groups = len(self.rewards)
        return {
            "step": self.step, "version": self.version,
            "reward_mean": float(all_r.mean()) if all_r.numel() else float("nan"),
            "reward_std": float(all_r.std()) if all_r.numel() > 1 else 0.0,
            **{f"reward/{k}_mean": float(torch.cat(v).mean()) for k, v in self.components.items()},
            **{f"reward/{k}_std": float(torch.cat(v).std()) for k, v in self.components.items()},
            "loss": self.update.loss,
            **{f"learner/{k}": v for k, v in self.update.metrics().items() if k != "loss"},
            **self.plan,
            "rollout_seconds": span_seconds(self.rollout_spans), "reward_seconds": span_seconds(self.reward_spans),
            "wait_seconds": self.wait_seconds, "learner_seconds": self.learner_seconds, **self.sync.metrics(),
            "staleness_mean": float(stale.mean()) if stale.size else 0.0,
            "staleness_max": int(stale.max()) if stale.size else 0,
            "staleness_hist": {str(int(k)): int(v) for k, v in zip(values, counts)},
            "groups": groups, "groups_reissued": self.reissued, "groups_stale_dropped": self.stale_dropped,
            "step_seconds": self.step_seconds, "rollout_workers": self.rollout_workers,
            # compute, in image-token positions through the policy (a guided pass counts twice): the rollouts',
            # the learner's forward passes (recomputations included), and both with backward ~ 2 forwards
            "rollout_tokens": self.rollout_tokens, "learner_tokens": self.update.learner_tokens,
            "compute_tokens": self.rollout_tokens + 3 * self.update.learner_tokens,
            "images_per_second": groups * self.group_size / max(self.step_seconds, 1e-9),
            **self.extra,
        }
