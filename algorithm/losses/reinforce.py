"""The importance-weighted policy gradient without a clip (`algorithm.loss: reinforce`): ``loss = −A·r`` per row
(on-policy its gradient is −A·∇log π, REINFORCE with the group baseline), plus the KL term when β > 0. A baseline
for the clip's effect: nothing bounds a stale or drifting ratio."""
from __future__ import annotations

from typing import Optional

import torch

from . import LOSSES, PolicyLoss, RowLoss, log_ratio, with_kl


@LOSSES.register("reinforce")
class Reinforce(PolicyLoss):
    def __call__(self, logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                 ref_logp: Optional[torch.Tensor] = None) -> RowLoss:
        ratio = log_ratio(logp, behaviour_logp).exp()
        loss = -advantages.to(logp) * ratio
        return with_kl(loss, ratio, torch.zeros_like(ratio, dtype=torch.bool), logp, ref_logp, self.config.kl_beta)
