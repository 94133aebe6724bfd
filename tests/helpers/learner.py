"""The learner tests' fixed batch."""
from __future__ import annotations

import torch

from benchmarks.tiny_models import random_showo, sample_groups
from policy.showo import Showo
from policy.trajectory import Trajectory


FIXED_BATCH_SEED = 5


def fixed_batch() -> tuple[dict[str, torch.Tensor], list[Trajectory], list[torch.Tensor], list[str]]:
    """The learner tests' fixed batch: 2 groups x 3 rollouts x 4 steps from a tiny random Show-o (seed 5), fixed
    rewards; returns (the model's state dict, trajectories, rewards, prompts)."""
    model = random_showo(seed=FIXED_BATCH_SEED)
    trajs, prompts = sample_groups(model, num_groups=2, group_size=3, steps=4, seed=2)
    rewards = [torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.2, 0.9, 0.4])]
    return model.state_dict(), trajs, rewards, prompts


def model_with(state: dict[str, torch.Tensor]) -> Showo:
    """A fresh tiny random Show-o (the fixed batch's architecture) holding `state`."""
    model = random_showo(seed=FIXED_BATCH_SEED)
    model.load_state_dict(state)
    return model
