"""`algorithm.selector: entropy`: each sample's `select_k` steps of highest policy entropy, from the sampler's
record of each step (the mean over the still-masked positions of −Σ p log p of the distribution it sampled:
`Trajectory.self_certainty`, negated): the steps where the policy was least decided carry the most choice."""
from __future__ import annotations

import torch

from . import SELECTORS, StepSelector, top_k_per_row


@SELECTORS.register("entropy")
class HighestEntropy(StepSelector):
    def select(self, group, owner: torch.Tensor, seed: int) -> torch.Tensor:
        return top_k_per_row(-self.signal(group, "self_certainty"), owner, self.config.select_k)
