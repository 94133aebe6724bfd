"""`algorithm.selector: every_n`: steps 0, n, 2n, ... (`select_n`): the budget spread over the whole schedule."""
from __future__ import annotations

import torch

from . import SELECTORS, StepSelector, steps_mask


@SELECTORS.register("every_n")
class EveryN(StepSelector):
    def select(self, group, owner: torch.Tensor, seed: int) -> torch.Tensor:
        t = group.num_steps
        return owner & steps_mask(torch.arange(0, t, self.config.select_n), t)
