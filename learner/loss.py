"""The Mask-GRPO objective per (trajectory, step) row.

For row i (one trajectory's transition at one unmasking step) with advantage A_i:

    r_i    = exp(logp_cur_i − logp_behaviour_i)          logp_behaviour: RECORDED by the rollout worker
    loss_i = −min(A_i·r_i, A_i·clamp(r_i, clip_low, clip_high)) + β·k3_i
    k3_i   = exp(logp_ref_i − logp_cur_i) − (logp_ref_i − logp_cur_i) − 1      (β > 0 only)

The min is taken per row, before any averaging (the release took it after averaging and against the detached
current policy, so the clip never bound). The KL is the k3 estimator of KL(π_θ‖π_ref) for the transition of that
step (the action of the Mask-GRPO MDP), against a frozen copy of the initial policy. The engine scales and
averages the rows (`LearnerConfig.loss_average`).

Log-ratios are clamped at ``MAX_LOG_RATIO`` before the exponential: a row whose ratio would overflow float32
(an absurdly stale behaviour log-prob) would otherwise turn its zero clipped gradient into NaN (0·inf).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from policy.family import MaskedModel
from policy.logprob import transition_logprobs
from policy.trajectory import Trajectory

MAX_LOG_RATIO = 20.0


@dataclass
class RowLoss:
    loss: torch.Tensor              # float [R] per-row objective (differentiable), before scaling/averaging
    ratio: torch.Tensor             # float [R] detached importance ratio
    clipped: torch.Tensor           # bool [R] rows whose gradient the clip removed
    approx_kl: torch.Tensor         # float [R] detached k3 estimate of KL(behaviour‖current): (r − 1) − log r
    kl: Optional[torch.Tensor]      # float [R] detached k3 KL to the reference (None without a reference)


def clipped_surrogate(logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``−min(A·r, A·clamp(r, clip_low, clip_high))``, the ratio r, and the rows where the clip binds."""
    log_ratio = (logp - behaviour_logp.to(logp)).clamp(max=MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    adv = advantages.to(logp)
    loss = -torch.minimum(adv * ratio, adv * ratio.clamp(clip_low, clip_high))
    r = ratio.detach()
    clipped = ((adv > 0) & (r > clip_high)) | ((adv < 0) & (r < clip_low))
    return loss, ratio, clipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator exp(Δ) − Δ − 1 with Δ = logp_ref − logp_cur (≥ 0, zero iff equal), per row."""
    delta = (ref_logp.to(logp) - logp).clamp(max=MAX_LOG_RATIO)
    return delta.exp() - delta - 1.0


def mask_grpo_row_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                       clip_low: float = 0.9, clip_high: float = 1.2, kl_beta: float = 0.0,
                       ref_logp: Optional[torch.Tensor] = None) -> RowLoss:
    """The Mask-GRPO loss of each row (all inputs float [R]; `ref_logp` needed iff kl_beta > 0)."""
    loss, ratio, clipped = clipped_surrogate(logp, behaviour_logp, advantages, clip_low, clip_high)
    kl = None
    if kl_beta > 0.0:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs the reference policy's log-probabilities")
        kl_t = k3_kl(logp, ref_logp)
        loss = loss + kl_beta * kl_t
        kl = kl_t.detach()
    r = ratio.detach()
    approx_kl = (r - 1.0) - r.clamp(min=1e-30).log()
    return RowLoss(loss, r, clipped, approx_kl, kl)


@torch.no_grad()
def policy_step_logprobs(model: MaskedModel, traj: Trajectory, transition: str,
                         steps: Optional[torch.Tensor] = None, prefix_reuse: bool = True) -> torch.Tensor:
    """The model's per-step transition log-probabilities [B, S] without gradients (e.g. to fill in the behaviour
    log-probs of trajectories recorded without them, or to score with a reference policy)."""
    was_training = model.training
    model.eval()
    try:
        return transition_logprobs(model, traj, transition, steps, prefix_reuse).logprob.float().cpu()
    finally:
        model.train(was_training)


def scored_terms(traj: Trajectory, transition: str, steps: torch.Tensor) -> torch.Tensor:
    """How many positions each (rollout, step) transition scores, float [B, S] (equals `StepLogprobs.num_terms`;
    computed from the trajectory alone, so averaging weights are known before any forward pass)."""
    masked, kept, _ = traj.step_masks(steps)
    m = kept if transition == "candidate2" else masked   # candidate 1 scores kept + re-masked = all masked
    return m.sum(-1).float()
