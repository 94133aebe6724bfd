"""Self-certainty: an intrinsic reward that needs no reward model.

At each unmasking step t the sampler already holds the policy's log-probabilities over the codebook at every
position; it records ``s_t = mean over the positions still masked at the start of t of Σ_c p_c log p_c`` (the
negative entropy; with classifier-free guidance p is the guided distribution that is sampled). A rollout's
self-certainty is ``(1/T) Σ_t s_t`` (<= 0; 0 means every prediction was one-hot), `Trajectory.certainty_score`.

Rewards see images, prompts and per-sample metadata; trajectory fields reach them through the metadata: when the
reward worker scores trajectories it adds ``metadata["self_certainty"]`` (a float per sample, from
`trajectory_metadata`). So this reward also works behind the reward server, as long as the client sends it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from rewards.base import Reward, register_reward

KEY = "self_certainty"


def trajectory_metadata(metadata: Sequence[Mapping[str, Any]] | None, trajectory: Any) -> list[dict[str, Any]]:
    """Each sample's metadata with the trajectory's per-sample fields added (``self_certainty`` when recorded)."""
    b = trajectory.batch_size
    metas = [dict(m) for m in (metadata or [{}] * b)]
    if getattr(trajectory, "self_certainty", None) is not None:
        for m, v in zip(metas, trajectory.certainty_score().tolist()):
            m[KEY] = v
    return metas


@register_reward("self_certainty")
class SelfCertaintyReward(Reward):
    """The rollout's self-certainty (<= 0) as its reward, read from ``metadata["self_certainty"]``.

    ``scale``: multiplies it (e.g. to put it on the scale of an image reward in a weighted sum; the weight does
    the same). ``device`` is accepted and ignored (the reward worker passes one to every reward)."""

    def __init__(self, scale: float = 1.0, device: str | None = None):
        self.scale = float(scale)

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        missing = [i for i, m in enumerate(metadata) if KEY not in m]
        if missing:
            raise ValueError(f"reward {self.name!r} needs metadata[{KEY!r}] for every sample (the sampler records "
                             f"it in the Trajectory and the reward worker adds it when it scores trajectories); "
                             f"sample {missing[0]} has none")
        return torch.tensor([float(m[KEY]) for m in metadata], dtype=torch.float32) * self.scale
