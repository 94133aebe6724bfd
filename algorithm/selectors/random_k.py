"""`algorithm.selector: random_k`: `select_k` distinct steps drawn per group from a generator seeded by the group's
seed (the same steps for every sample of the group: flow_grpo's timestep fraction)."""
from __future__ import annotations

import torch

from . import SELECTORS, StepSelector, steps_mask


@SELECTORS.register("random_k")
class RandomK(StepSelector):
    def select(self, group, owner: torch.Tensor, seed: int) -> torch.Tensor:
        t = group.num_steps
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        steps = torch.randperm(t, generator=gen)[:min(self.config.select_k, t)].sort().values
        return owner & steps_mask(steps, t)
