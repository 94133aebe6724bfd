"""Policy losses (`algorithm.loss`): the objective of each trained (sample, step) row. One module per loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..registry import Registry

MAX_LOG_RATIO = 20.0     # log-ratios are clamped here before the exponential (see `log_ratio`)


@dataclass
class RowLoss:
    loss: torch.Tensor              # float [R] per-row objective (differentiable), before scaling/averaging
    ratio: torch.Tensor             # float [R] detached importance ratio
    clipped: torch.Tensor           # bool [R] rows whose gradient the clip removed
    approx_kl: torch.Tensor         # float [R] detached k3 estimate of KL(behaviour‖current): (r − 1) − log r
    kl: Optional[torch.Tensor]      # float [R] detached k3 KL to the reference (None without a reference)


class PolicyLoss:
    """A loss over rows: `logp` (current, differentiable), `behaviour_logp`, `advantages`, optionally the
    reference's log-probs (float [R] each)."""
    name: ClassVar[str]

    def __init__(self, config):
        self.config = config

    def __call__(self, logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                 ref_logp: Optional[torch.Tensor] = None) -> RowLoss:
        raise NotImplementedError


def log_ratio(logp: torch.Tensor, behaviour_logp: torch.Tensor) -> torch.Tensor:
    """log r = cur − behaviour, clamped at `MAX_LOG_RATIO`: a row whose ratio would overflow float32 (an absurdly
    stale behaviour log-prob) would otherwise turn its zero clipped gradient into NaN (0·inf)."""
    return (logp - behaviour_logp.to(logp)).clamp(max=MAX_LOG_RATIO)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator exp(Δ) − Δ − 1 with Δ = logp_ref − logp_cur (≥ 0, zero iff equal), per row."""
    delta = (ref_logp.to(logp) - logp).clamp(max=MAX_LOG_RATIO)
    return delta.exp() - delta - 1.0


def with_kl(loss: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor, logp: torch.Tensor,
            ref_logp: Optional[torch.Tensor], kl_beta: float) -> RowLoss:
    """`loss` plus β·k3(ref, cur) when β > 0, with the detached figures every loss reports."""
    kl = None
    if kl_beta > 0.0:
        if ref_logp is None:
            raise ValueError("algorithm.kl_beta > 0 needs the reference policy's log-probabilities")
        kl_t = k3_kl(logp, ref_logp)
        loss = loss + kl_beta * kl_t
        kl = kl_t.detach()
    r = ratio.detach()
    approx_kl = (r - 1.0) - r.clamp(min=1e-30).log()
    return RowLoss(loss, r, clipped, approx_kl, kl)


LOSSES: Registry[PolicyLoss] = Registry("loss", __name__)


def policy_loss(config) -> PolicyLoss:
    return LOSSES.get(config.loss)(config)
