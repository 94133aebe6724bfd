"""A training step's plan: the groups' rewards -> each group's credit per (sample, step) row, the filters, the rows
that train -> the learner ranks' `GroupUpdate`s. The driver calls `Planner.plan` once per step; learner ranks only
compute.

    credit   = estimator(groups)                    # algorithm/advantages/: advantages, and the rows that carry them
    owner   &= filters                              # low-std groups dropped, top/bottom samples kept
    train    = selector(group, owner, seed)         # algorithm/selectors/: which of those rows train
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from learner.update import GroupUpdate

from .advantages import GroupCredit, GroupOutcome, check_rewards, estimator
from .selectors import selector


def top_bottom_mask(r: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [G]: the k highest and k lowest rewards of the group (all if 2k >= G; ties by sample index)."""
    g = r.numel()
    if k <= 0 or 2 * k >= g:
        return torch.ones(g, dtype=torch.bool)
    order = torch.sort(r, stable=True).indices
    mask = torch.zeros(g, dtype=torch.bool)
    mask[order[:k]] = True
    mask[order[-k:]] = True
    return mask


@dataclass
class UpdatePlan:
    """One training step's learner work: a `GroupUpdate` per group with a row to train (in group order), and the
    step's credit figures."""
    groups: list[GroupUpdate]
    counts: dict[str, int] = field(default_factory=dict)
    adv_abs_mean: float = 0.0
    credits: list[GroupCredit] = field(default_factory=list)

    def for_rank(self, rank: int, num_ranks: int) -> list[GroupUpdate]:
        """The groups learner rank `rank` trains (whole groups, spread round robin)."""
        return self.groups[rank::num_ranks]

    def metrics(self) -> dict[str, float]:
        return {**{k: float(v) for k, v in self.counts.items()}, "adv_abs_mean": self.adv_abs_mean}


def group_seed(config, step: int, group_id: int) -> int:
    """The seed of a group's random choices (random_k): from the config seed, the training step and the group id,
    so the choice is reproducible, resumable and independent of the ranks."""
    return hash((config.seed, step, group_id))


class Planner:
    """The driver's side of the algorithm: its advantage estimator (with its state, e.g. the running tracker) and
    step selector."""

    def __init__(self, config):
        self.config = config
        self.estimator = estimator(config)
        self.selector = selector(config)

    def plan(self, outcomes: Sequence[GroupOutcome], trajectories: Sequence[Any], step: int = 0) -> UpdatePlan:
        """`outcomes` (rewards as given: checked here) and `trajectories` (a `Trajectory` or an object reference per
        group, passed through untouched)."""
        c = self.config
        if len(outcomes) != len(trajectories):
            raise ValueError(f"{len(outcomes)} group outcomes for {len(trajectories)} trajectories")
        rewards = check_rewards([o.rewards for o in outcomes], c.reward_name, [o.group_id for o in outcomes])
        outcomes = [GroupOutcome(o.group_id, o.prompt, r, o.num_steps, o.tree, o.signals)
                    for o, r in zip(outcomes, rewards)]
        credits = self.estimator.credit(outcomes)
        groups: list[GroupUpdate] = []
        kept_adv: list[torch.Tensor] = []
        counts = {"kept_groups": 0, "dropped_groups": 0, "dropped_low_std": 0, "kept_samples": 0, "dropped_samples": 0}
        for o, credit, traj in zip(outcomes, credits, trajectories):
            owner = credit.owner & top_bottom_mask(o.rewards, c.filter_top_bottom).view(-1, 1)
            if credit.std < c.filter_min_std:
                owner = torch.zeros_like(owner)
                counts["dropped_low_std"] += 1
            credit.owner = owner
            kept = owner.any(1)
            counts["kept_groups" if kept.any() else "dropped_groups"] += 1
            counts["kept_samples"] += int(kept.sum())
            counts["dropped_samples"] += int((~kept).sum())
            train = self.selector.select(o, owner, group_seed(c, step, o.group_id))
            adv = credit.advantages
            if kept.any():
                kept_adv.append(adv[kept] if adv.dim() == 1 else adv[train])
            if train.any():
                groups.append(GroupUpdate(traj, adv, train, group_id=o.group_id))
        adv_abs = float(torch.cat(kept_adv).abs().mean()) if kept_adv else 0.0
        return UpdatePlan(groups, counts, adv_abs, credits)

    def state_dict(self) -> dict[str, Any]:
        return self.estimator.state_dict()

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if state:
            self.estimator.load_state_dict(state)
