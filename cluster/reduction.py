"""Which unmasking steps the learner trains on (the sampler always runs all T steps).

The authors' release trains on the first 25 of 50 steps; random k (seeded, reproducible) and every n-th step
spread the same budget over the whole trajectory.
"""
from __future__ import annotations

import torch

from learner.config import LearnerConfig, Reduction


def select_steps(num_steps: int, config: LearnerConfig, seed: int = 0) -> torch.Tensor:
    """Sorted long [S] indices of the steps to train for one trajectory batch of `num_steps` steps.

    ``random_k`` draws k distinct steps from a generator seeded by `seed` (the driver passes a value derived
    from the config seed, the training step and the group), so the choice is reproducible and rank-independent.
    """
    if num_steps < 1:
        raise ValueError("a trajectory needs at least one step")
    kind = config.reduction
    if kind == Reduction.all:
        return torch.arange(num_steps)
    if kind == Reduction.first_k:
        return torch.arange(min(config.reduction_k, num_steps))
    if kind == Reduction.every_n:
        return torch.arange(0, num_steps, config.reduction_n)
    if kind == Reduction.random_k:
        k = min(config.reduction_k, num_steps)
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(num_steps, generator=gen)[:k].sort().values
    raise ValueError(f"unknown reduction {kind!r}")
