"""`algorithm.selector: certainty_change`: each sample's `select_k` steps where the policy's certainty moved most
from the step before (|s_t − s_{t−1}| of the sampler's per-step self-certainty; step 0 against itself, 0): the
steps that settle the image, as MaskFocus trains the steps where the intermediate image moves most towards the
final one — read here from the sampler's own signal, with no extra forward pass or image model."""
from __future__ import annotations

import torch

from . import SELECTORS, StepSelector, top_k_per_row


@SELECTORS.register("certainty_change")
class CertaintyChange(StepSelector):
    def select(self, group, owner: torch.Tensor, seed: int) -> torch.Tensor:
        s = self.signal(group, "self_certainty").double()
        change = torch.cat([torch.zeros_like(s[:, :1]), (s[:, 1:] - s[:, :-1]).abs()], dim=1)
        return top_k_per_row(change, owner, self.config.select_k)
