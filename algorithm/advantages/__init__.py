"""Advantage estimators (`algorithm.advantage`): a training step's rewards -> each group's credit per (sample,
step) row. One module per estimator: `group` (the paper's (r − mean)/(std + eps) within the group), `running`
(a per-prompt history, as flow_grpo), `tree` (per-depth credit in group trees).

Rewards arrive as one float tensor [G] per group. A reward that is NaN or infinite is a bug upstream (a reward model
that failed, an image that did not decode): it raises `RewardError` naming the reward and the sample, it is never
silently replaced by 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from rewards.base import RewardError

from ..registry import Registry


@dataclass
class GroupOutcome:
    """What the driver knows of a group when it plans its update (it never reads the trajectory itself)."""
    group_id: int
    prompt: str
    rewards: torch.Tensor                    # float64 [G], checked finite
    num_steps: int                           # T of the sampler
    tree: Any = None                         # `algorithm.tree.TreeSpec` when the group was sampled as a tree
    signals: Optional[dict[str, torch.Tensor]] = None   # per-step sampler signals ([G, T]) for informed selectors


@dataclass
class GroupCredit:
    """A group's credit: the advantage of every sample ([G]) or of every (sample, step) row ([G, T]), and which
    rows carry it (`owner`, bool [G, T]: a tree's shared steps are trained once, on one leaf)."""
    advantages: torch.Tensor                 # float32 [G] or [G, T]
    owner: torch.Tensor                      # bool [G, T]
    std: float                               # the group's reward std (filtering, metrics)


class AdvantageEstimator:
    name: ClassVar[str]

    def __init__(self, config):
        self.config = config

    def credit(self, groups: Sequence[GroupOutcome]) -> list[GroupCredit]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the estimator (the driver's state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_rewards(rewards: Sequence[Any], reward_name: str = "reward",
                  group_ids: Optional[Sequence[Any]] = None,
                  group_sizes: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """Float64 CPU copies of the rewards, validated: 1-D, one per sample, finite."""
    out = []
    for g, r in enumerate(rewards):
        gid = group_ids[g] if group_ids is not None else g
        r = torch.as_tensor(r).detach().to("cpu", torch.float64)
        if r.dim() != 1 or r.numel() == 0:
            raise RewardError(reward_name, f"reward {reward_name!r} of group {gid}: expected a 1-D tensor with one "
                              f"value per sample, got shape {tuple(r.shape)}")
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
    """The rewards' standard deviation (0 for one value)."""
    if r.numel() < 2:
        return 0.0
    return float(r.std(correction=1 if unbiased else 0))


def normalised(r: torch.Tensor, eps: float = 1e-4, unbiased: bool = True) -> torch.Tensor:
    """(r − mean) / (std + eps) (float64 [n])."""
    return (r - r.mean()) / (reward_std(r, unbiased) + eps)


def every_row(g: int, num_steps: int) -> torch.Tensor:
    return torch.ones(g, num_steps, dtype=torch.bool)


ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage", __name__)


def estimator(config) -> AdvantageEstimator:
    return ESTIMATORS.get(config.advantage)(config)
