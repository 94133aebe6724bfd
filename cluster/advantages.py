"""The algorithm the driver holds: group-relative advantages, the running per-prompt statistics tracker,
low-signal group filtering, and which unmasking steps each group trains (`plan_update`).

Rewards arrive as one float tensor [G] per group (the G samples of one prompt). A reward that is NaN or
infinite is a bug upstream (a reward model that failed, an image that did not decode): it raises `RewardError`
naming the reward and the sample, it is never silently replaced by 0. The learner ranks receive the result as
`GroupUpdate`s (trajectory reference, advantages, kept samples, steps) and only compute.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from learner.config import Advantage, LearnerConfig
from learner.update import GroupUpdate
from rewards.base import RewardError

from .reduction import select_steps


def check_rewards(rewards: Sequence[Any], reward_name: str = "reward",
                  group_ids: Optional[Sequence[Any]] = None,
                  group_sizes: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """Float64 CPU copies of the rewards, validated: 1-D, one per sample, finite."""
    out = []
    for g, r in enumerate(rewards):
        gid = group_ids[g] if group_ids is not None else g
        r = torch.as_tensor(r).detach().to("cpu", torch.float64)
        if r.dim() != 1 or r.numel() == 0:
            raise RewardError(reward_name, f"reward {reward_name!r} of group {gid}: expected a 1-D tensor with one value per "
                              f"sample, got shape {tuple(r.shape)}")
        if group_sizes is not None and r.numel() != group_sizes[g]:
            raise RewardError(reward_name, f"reward {reward_name!r} of group {gid}: {r.numel()} values for "
                              f"{group_sizes[g]} samples")
        bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise RewardError(reward_name, f"reward {reward_name!r} is {r[i].item()} for sample {i} of group {gid} "
                              f"({len(bad)} non-finite value(s) in this group): the reward model failed on this "
                              f"sample; fix the reward instead of training on it", sample=i)
        out.append(r)
    return out


def reward_std(r: torch.Tensor, unbiased: bool = True) -> float:
    """The group's reward standard deviation (0 for a group of one)."""
    if r.numel() < 2:
        return 0.0
    return float(r.std(correction=1 if unbiased else 0))


def group_advantages(r: torch.Tensor, eps: float = 1e-4, unbiased: bool = True) -> torch.Tensor:
    """(r − mean) / (std + eps) within one group (float64 [G])."""
    return (r - r.mean()) / (reward_std(r, unbiased) + eps)


class PromptStatTracker:
    """Running reward statistics per prompt text, as image-RL trainers keep them (flow_grpo's per-prompt tracker).

    Each prompt remembers its last `buffer_size` rewards; a group's advantages are its rewards normalised by
    the mean and std of that history (which includes the group itself). With fewer than `min_count` rewards
    remembered, the group's own statistics are used.
    """

    def __init__(self, buffer_size: int = 64, min_count: int = 2, eps: float = 1e-4, unbiased: bool = True):
        self.buffer_size, self.min_count, self.eps, self.unbiased = buffer_size, min_count, eps, unbiased
        self.history: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Sequence[torch.Tensor]) -> None:
        for prompt, r in zip(prompts, rewards):
            buf = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(float(x) for x in torch.as_tensor(r).flatten().tolist())

    def stats(self, prompt: str) -> Optional[tuple[float, float, int]]:
        """(mean, std, count) of the prompt's history, or None if too short."""
        buf = self.history.get(prompt)
        if not buf or len(buf) < self.min_count:
            return None
        h = torch.tensor(list(buf), dtype=torch.float64)
        return float(h.mean()), reward_std(h, self.unbiased), len(buf)

    def advantages(self, prompt: str, r: torch.Tensor) -> torch.Tensor:
        s = self.stats(prompt)
        if s is None:
            return group_advantages(r, self.eps, self.unbiased)
        mean, std, _ = s
        return (r - mean) / (std + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "eps": self.eps,
                "unbiased": self.unbiased, "history": {p: list(b) for p, b in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.eps, self.unbiased = float(state["eps"]), bool(state["unbiased"])
        self.history = {p: deque(b, maxlen=self.buffer_size) for p, b in state["history"].items()}


@dataclass
class AdvantageResult:
    """Advantages of every sample of every group, and which samples the learner trains on."""
    advantages: list[torch.Tensor]          # float32 [G] per group (also for dropped samples, for logging)
    keep: list[torch.Tensor]                # bool [G] per group: the samples that are trained
    group_std: list[float] = field(default_factory=list)
    dropped_low_std: int = 0                # groups dropped by the std filter

    @property
    def kept_groups(self) -> int:
        return sum(bool(k.any()) for k in self.keep)

    @property
    def dropped_groups(self) -> int:
        return len(self.keep) - self.kept_groups

    @property
    def kept_samples(self) -> int:
        return int(sum(int(k.sum()) for k in self.keep))

    @property
    def dropped_samples(self) -> int:
        return int(sum(k.numel() - int(k.sum()) for k in self.keep))

    def counts(self) -> dict[str, int]:
        return {"kept_groups": self.kept_groups, "dropped_groups": self.dropped_groups,
                "dropped_low_std": self.dropped_low_std, "kept_samples": self.kept_samples,
                "dropped_samples": self.dropped_samples}


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


def compute_advantages(rewards: Sequence[torch.Tensor], prompts: Sequence[str], config: LearnerConfig,
                       tracker: Optional[PromptStatTracker] = None,
                       group_ids: Optional[Sequence[Any]] = None) -> AdvantageResult:
    """Advantages and filtering for the groups of one training step.

    With ``config.advantage == "running"`` the `tracker` is first updated with these groups' rewards, then each
    group is normalised by its prompt's statistics. Filtering uses each group's own reward std: groups with
    std < ``filter_min_std`` are dropped; ``filter_top_bottom`` = k keeps the k best and k worst samples.
    Advantages are computed on the whole group before the top/bottom selection.
    """
    if len(rewards) != len(prompts):
        raise ValueError(f"{len(rewards)} reward tensors for {len(prompts)} prompts")
    rs = check_rewards(rewards, config.reward_name, group_ids)
    if config.advantage == Advantage.running:
        if tracker is None:
            raise ValueError("advantage='running' needs a PromptStatTracker")
        tracker.update(prompts, rs)
    advantages, keep, stds, dropped = [], [], [], 0
    for prompt, r in zip(prompts, rs):
        std = reward_std(r, config.adv_std_unbiased)
        if config.advantage == Advantage.running:
            a = tracker.advantages(prompt, r)  # type: ignore[union-attr]
        else:
            a = group_advantages(r, config.adv_eps, config.adv_std_unbiased)
        k = top_bottom_mask(r, config.filter_top_bottom)
        if std < config.filter_min_std:
            k = torch.zeros_like(k)
            dropped += 1
        advantages.append(a.float())
        keep.append(k)
        stds.append(std)
    return AdvantageResult(advantages, keep, stds, dropped)


@dataclass
class UpdatePlan:
    """One training step's learner work: a `GroupUpdate` per group with at least one kept sample (in group
    order), and the advantage result of every group (for the step's metrics)."""
    groups: list[GroupUpdate]
    result: AdvantageResult

    def for_rank(self, rank: int, num_ranks: int) -> list[GroupUpdate]:
        """The groups learner rank `rank` trains (whole groups, spread round robin)."""
        return self.groups[rank::num_ranks]

    def metrics(self) -> dict[str, float]:
        res = self.result
        kept = [a[k] for a, k in zip(res.advantages, res.keep) if k.any()]
        adv_abs = float(torch.cat(kept).abs().mean()) if kept else 0.0
        return {**{k: float(v) for k, v in res.counts().items()}, "adv_abs_mean": adv_abs}


def plan_update(trajectories: Sequence[Any], rewards: Sequence[torch.Tensor], prompts: Sequence[str],
                config: LearnerConfig, num_steps: int, tracker: Optional[PromptStatTracker] = None,
                group_ids: Optional[Sequence[int]] = None, step: int = 0) -> UpdatePlan:
    """Advantages, filtering and trained steps for one training step's groups.

    `trajectories`: one per group (a `Trajectory` or an object reference, passed through untouched); `rewards`:
    float [G] per group; `num_steps`: the sampler's T. Steps are chosen per group from a seed derived from
    (config.seed, step, group id), so the choice is reproducible, resumable and independent of the ranks."""
    ids = list(group_ids) if group_ids is not None else list(range(len(trajectories)))
    if not (len(trajectories) == len(rewards) == len(prompts) == len(ids)):
        raise ValueError(f"{len(trajectories)} trajectories, {len(rewards)} reward tensors, {len(prompts)} prompts "
                         f"and {len(ids)} group ids: need one of each per group")
    res = compute_advantages(rewards, prompts, config, tracker, ids)
    groups = [GroupUpdate(traj, adv, keep, select_steps(num_steps, config, seed=hash((config.seed, step, gid))),
                          group_id=gid)
              for traj, adv, keep, gid in zip(trajectories, res.advantages, res.keep, ids) if keep.any()]
    return UpdatePlan(groups, res)
