"""`algorithm.selector: after_branch`: the first `select_k` steps after each sample's branch point (in a group tree
the last branch step; without a tree, step 0): Flow-GRPO-Fast trains the one or two steps right after the group
branches, where the branches' decisions differ."""
from __future__ import annotations

import torch

from . import SELECTORS, StepSelector, steps_mask


@SELECTORS.register("after_branch")
class AfterBranch(StepSelector):
    def select(self, group, owner: torch.Tensor, seed: int) -> torch.Tensor:
        t = group.num_steps
        start = group.tree.branch_steps[-1] if group.tree is not None else 0
        return owner & steps_mask(torch.arange(start, min(start + self.config.select_k, t)), t)
