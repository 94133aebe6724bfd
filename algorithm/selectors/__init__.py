"""Step selectors (`algorithm.selector`): which (sample, step) rows of a group train, among those that carry
credit (the sampler still runs every step). One module per selector. Informed selectors read the sampler's own
per-step signals, which travel with the group's metadata (`actors.types.GroupMeta.signals`): no extra forward
pass."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..advantages import GroupOutcome
from ..registry import Registry


class StepSelector:
    name: ClassVar[str]

    def __init__(self, config):
        self.config = config

    def select(self, group: GroupOutcome, owner: torch.Tensor, seed: int) -> torch.Tensor:
        """bool [G, T]: the rows that train (a subset of `owner`, bool [G, T]); `seed` is the group's (from the
        config seed, the training step and the group id: reproducible, resumable, independent of the ranks)."""
        raise NotImplementedError

    def signal(self, group: GroupOutcome, name: str) -> torch.Tensor:
        """The sampler's per-step signal `name` [G, T] of `group`, or an error naming the selector and the group."""
        if not group.signals or name not in group.signals:
            raise ValueError(f"algorithm.selector={self.name} needs the sampler's per-step {name.replace('_', '-')} "
                             f"of group {group.group_id} (recorded by policy.sampler; sent in the group's metadata)")
        return group.signals[name]


def steps_mask(steps: torch.Tensor, num_steps: int) -> torch.Tensor:
    """bool [T] from step indices."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[steps] = True
    return mask


def top_k_per_row(score: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """bool [G, T]: in each row the k owned entries of highest score (ties: the earlier step)."""
    g, t = score.shape
    masked = torch.where(owner, score.double(), float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :min(k, t)]
    out = torch.zeros(g, t, dtype=torch.bool)
    out[torch.arange(g).unsqueeze(1), order] = True
    return out & owner


SELECTORS: Registry[StepSelector] = Registry("selector", __name__)


def selector(config) -> StepSelector:
    return SELECTORS.get(config.selector)(config)
