"""Self-certainty: an intrinsic reward that needs no reward model.

At each unmasking step t the sampler already holds the policy's log-probabilities over the codebook at every
position; it records ``s_t = mean over the positions still masked at the start of t of Σ_c p_c log p_c`` (the
negative entropy; with classifier-free guidance p is the guided distribution that is sampled). A rollout's
self-certainty is ``(1/T) Σ_t s_t`` (<= 0; 0 means every prediction was one-hot), `Trajectory.certainty_score`.

The reward declares ``needs = ("self_certainty",)`` (`Reward.needs`): the reward worker adds each sample's
``metadata["self_certainty"]`` (a float, `rewards.worker.TRAJECTORY_INPUTS`) and decodes no image for it. So it
also works behind the reward server, as long as the client sends it (a ``remote`` spec with
``needs: [images, self_certainty]``).
"""
from __future__ import annotations

import torch

from rewards.base import Reward, register_reward

KEY = "self_certainty"


@register_reward("self_certainty")
class SelfCertaintyReward(Reward):
    """The rollout's self-certainty (<= 0) as its reward, read from ``metadata["self_certainty"]``.

    ``scale``: multiplies it (e.g. to put it on the scale of an image reward in a weighted sum; the weight does
    the same). ``device`` is accepted and ignored (the reward worker passes one to every reward)."""
    needs = (KEY,)

    def __init__(self, scale: float = 1.0, device: str | None = None):
        self.scale = float(scale)

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        missing = [i for i, m in enumerate(metadata) if KEY not in m]
        if missing:
            raise ValueError(f"reward {self.name!r} needs metadata[{KEY!r}] for every sample (the sampler records "
                             f"it in the Trajectory and the reward worker adds it to the rewards that need it); "
                             f"sample {missing[0]} has none")
        return torch.tensor([float(m[KEY]) for m in metadata], dtype=torch.float32) * self.scale
