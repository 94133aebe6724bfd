"""`algorithm.selector: all`: every step that carries credit trains (the paper)."""
from __future__ import annotations

import torch

from . import SELECTORS, StepSelector


@SELECTORS.register("all")
class AllSteps(StepSelector):
    def select(self, group, owner: torch.Tensor, seed: int) -> torch.Tensor:
        return owner
