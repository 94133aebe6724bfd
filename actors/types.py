"""Small records that cross process boundaries between the driver and the actors."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class GroupRequest:
    """One GRPO group to sample: G rollouts of one prompt, one seed each (with a group `tree`: one per node)."""
    group_id: int                 # unique in the run; results are accepted once per id (no double training)
    step: int                     # the training step the group is meant for
    prompt_index: int
    prompt: str
    metadata: dict[str, Any]
    seeds: list[int]
    tree: Optional[dict[str, list[int]]] = None   # `algorithm.tree.TreeSpec.to_dict()`: sample the group as a tree

    @property
    def group_size(self) -> int:
        """The samples of the group (a tree's leaves)."""
        return math.prod(self.tree["factors"]) if self.tree else len(self.seeds)


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
    rollout_tokens: float = 0.0   # image-token positions the rollout model evaluated for this group
    # the sampler's per-step signals, per sample ([G][T]: "self_certainty"), for the algorithm's informed selectors
    signals: dict[str, list[list[float]]] = field(default_factory=dict)
