"""Mask-GRPO's loss (`algorithm.loss: clipped`), per (sample, step) row with advantage A:

    r      = exp(logp_cur − logp_behaviour)          logp_behaviour: RECORDED by the rollout worker
    loss   = −min(A·r, A·clamp(r, clip_low, clip_high)) + β·k3(ref, cur)

The min is taken per row, before any averaging (the release took it after averaging and against the detached
current policy, so the clip never bound). The KL is the k3 estimator of KL(π_θ‖π_ref) for the transition of that
step (the action of the Mask-GRPO MDP), against a frozen copy of the initial policy.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import LOSSES, PolicyLoss, RowLoss, log_ratio, with_kl


def clipped_surrogate(logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``−min(A·r, A·clamp(r, clip_low, clip_high))``, the ratio r, and the rows where the clip binds."""
    ratio = log_ratio(logp, behaviour_logp).exp()
    adv = advantages.to(logp)
    loss = -torch.minimum(adv * ratio, adv * ratio.clamp(clip_low, clip_high))
    r = ratio.detach()
    clipped = ((adv > 0) & (r > clip_high)) | ((adv < 0) & (r < clip_low))
    return loss, ratio, clipped


@LOSSES.register("clipped")
class Clipped(PolicyLoss):
    def __call__(self, logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                 ref_logp: Optional[torch.Tensor] = None) -> RowLoss:
        c = self.config
        loss, ratio, clipped = clipped_surrogate(logp, behaviour_logp, advantages, c.clip_low, c.clip_high)
        return with_kl(loss, ratio, clipped, logp, ref_logp, c.kl_beta)
