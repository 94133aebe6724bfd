"""`algorithm.advantage: tree`: per-depth credit in group trees (`algorithm.tree`).

A node's value is the mean reward of its leaves; its advantage is its value normalised against its siblings' (the
nodes with the same parent): (v − mean_siblings) / (std_siblings + eps). The node's credit goes to the steps it
owns (`TreeSpec.segment`: from its branch step to the next one), trained once: on the node's first leaf, since
every leaf below it holds the same rows there. The root's steps (before the first branch) have no siblings to be
compared with and carry no credit: they are not trained. With one branch step this is GRPO on the steps after the
branch point (Flow-GRPO-Fast); deeper trees send credit to the step where branches diverged (TreeGRPO,
BranchGRPO).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import ESTIMATORS, AdvantageEstimator, GroupCredit, GroupOutcome, normalised, reward_std


def tree_credit(rewards: torch.Tensor, tree, num_steps: int, eps: float = 1e-4,
                unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages float32 [G, T], owner bool [G, T]) of one group's leaves under `tree`."""
    g = rewards.numel()
    adv = torch.zeros(g, num_steps, dtype=torch.float64)
    owner = torch.zeros(g, num_steps, dtype=torch.bool)
    for depth in range(1, tree.depth + 1):
        nodes = tree.nodes_at(depth)
        leaves_per_node = g // nodes
        values = rewards.view(nodes, leaves_per_node).mean(1)                  # [nodes]
        siblings = tree.factors[depth - 1]
        node_adv = torch.cat([normalised(v, eps, unbiased) for v in values.view(-1, siblings)])   # per parent
        start, end = tree.segment(depth, num_steps)
        first_leaves = torch.arange(nodes) * leaves_per_node                   # each node's representative leaf
        adv[first_leaves, start:end] = node_adv.view(-1, 1)
        owner[first_leaves, start:end] = siblings > 1                          # a single child has no siblings
    return adv.float(), owner


@ESTIMATORS.register("tree")
class TreeAdvantage(AdvantageEstimator):
    def credit(self, groups: Sequence[GroupOutcome]) -> list[GroupCredit]:
        c = self.config
        out = []
        for g in groups:
            if g.tree is None:
                raise ValueError(f"group {g.group_id} was not sampled as a tree (algorithm.tree is empty) but "
                                 f"algorithm.advantage=tree")
            adv, owner = tree_credit(g.rewards, g.tree, g.num_steps, c.adv_eps, c.adv_std_unbiased)
            out.append(GroupCredit(adv, owner, reward_std(g.rewards, c.adv_std_unbiased)))
        return out
