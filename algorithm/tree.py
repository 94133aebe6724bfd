"""Group trees: a group sampled as one prefix per prompt that branches at given unmasking steps.

A tree with branch steps ``k_1 < … < k_D`` and factors ``f_1 … f_D`` samples one root rollout per prompt for steps
``[0, k_1)``, then ``f_1`` branches of it for ``[k_1, k_2)``, each of those branching ``f_2`` times, …, and the
``G = f_1·…·f_D`` leaves finish the schedule. The steps before ``k_1`` are computed once for the whole group; a node
at depth d owns the steps ``[k_d, k_{d+1})`` (``k_{D+1} = T``), shared by its leaves. Flow-GRPO-Fast is the
one-branch tree ``(k), (G)``; G independent samples (the paper's group) are ``(0), (G)``.

Leaves are numbered in depth-first order, so the leaves below a node are contiguous: the ancestor at depth d of
leaf g is ``g // (f_{d+1}·…·f_D)``. Seeds: one per node, listed root first, then each depth's nodes in order
(`num_nodes` of them): every node draws its own randomness, so a sample is the same whichever worker samples it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class TreeSpec:
    branch_steps: tuple[int, ...]
    factors: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "branch_steps", tuple(int(k) for k in self.branch_steps))
        object.__setattr__(self, "factors", tuple(int(f) for f in self.factors))
        if not self.factors or len(self.factors) != len(self.branch_steps):
            raise ValueError(f"a group tree needs one factor per branch step, got steps {list(self.branch_steps)} "
                             f"and factors {list(self.factors)}")
        if any(f < 1 for f in self.factors) or any(b <= a for a, b in zip(self.branch_steps, self.branch_steps[1:])) \
                or self.branch_steps[0] < 0:
            raise ValueError(f"group tree: branch steps must increase from >= 0 ({list(self.branch_steps)}) and "
                             f"factors be >= 1 ({list(self.factors)})")

    @staticmethod
    def of(value: Any) -> Optional["TreeSpec"]:
        """A spec from a config mapping / object with ``branch_steps`` and ``factors`` (None when empty)."""
        if value is None or isinstance(value, TreeSpec):
            return value
        get = value.get if isinstance(value, dict) else lambda k: getattr(value, k)
        steps, factors = list(get("branch_steps") or []), list(get("factors") or [])
        return TreeSpec(tuple(steps), tuple(factors)) if steps or factors else None

    def to_dict(self) -> dict[str, list[int]]:
        return {"branch_steps": list(self.branch_steps), "factors": list(self.factors)}

    @property
    def depth(self) -> int:
        return len(self.factors)

    @property
    def leaves(self) -> int:
        return math.prod(self.factors)

    def nodes_at(self, depth: int) -> int:
        """Nodes at `depth` (0: the root)."""
        return math.prod(self.factors[:depth])

    @property
    def num_nodes(self) -> int:
        """Every node, the root included: the seeds a tree needs."""
        return sum(self.nodes_at(d) for d in range(self.depth + 1))

    def check(self, num_steps: int, group_size: int) -> None:
        if self.leaves != group_size:
            raise ValueError(f"group tree factors {list(self.factors)} give {self.leaves} leaves, not "
                             f"data.group_size={group_size}")
        if self.branch_steps[-1] >= num_steps:
            raise ValueError(f"group tree branch steps {list(self.branch_steps)} must lie below sampler.steps="
                             f"{num_steps}")

    def segment(self, depth: int, num_steps: int) -> tuple[int, int]:
        """The steps ``[start, end)`` a node at `depth` owns (depth 0: the root's shared prefix)."""
        start = 0 if depth == 0 else self.branch_steps[depth - 1]
        end = self.branch_steps[depth] if depth < self.depth else num_steps
        return start, end

    def ancestor(self, leaf: int, depth: int) -> int:
        """The index, among its depth's nodes, of the ancestor at `depth` of `leaf` (depth D: the leaf itself)."""
        return leaf // math.prod(self.factors[depth:])

    def node_seeds(self, seeds: Sequence[int], depth: int) -> list[int]:
        """The seeds of the nodes at `depth` from one group's `num_nodes` seeds (root first, depth by depth)."""
        start = sum(self.nodes_at(d) for d in range(depth))
        return list(seeds[start:start + self.nodes_at(depth)])
