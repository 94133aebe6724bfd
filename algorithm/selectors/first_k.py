"""`algorithm.selector: first_k`: the first `select_k` steps (the authors' release trains the first 25 of 50)."""
from __future__ import annotations

import torch

from . import SELECTORS, StepSelector, steps_mask


@SELECTORS.register("first_k")
class FirstK(StepSelector):
    def select(self, group, owner: torch.Tensor, seed: int) -> torch.Tensor:
        t = group.num_steps
        return owner & steps_mask(torch.arange(min(self.config.select_k, t)), t)
