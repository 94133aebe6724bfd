"""Small records that cross process boundaries between the driver and the actors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class GroupRequest:
    """One GRPO group to sample: G rollouts of one prompt, one seed each."""
    group_id: int                 # unique in the run; results are accepted once per id (no double training)
    step: int                     # the training step the group is meant for
    prompt_index: int
    prompt: str
    metadata: dict[str, Any]
    seeds: list[int]


@dataclass
class GroupMeta:
    """What a rollout worker returns beside the group's trajectory object reference."""
    group_id: int
    step: int
    prompt_index: int
    prompt: str
    metadata: dict[str, Any]
    policy_version: int
    worker_id: int
    started: float           # wall-clock time (time.time()) the worker's rollout call began and ended
    finished: float
