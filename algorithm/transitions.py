"""Mask-GRPO's transition probability of one unmasking step: each definition written once, as the per-position
terms it sums, and used for the behaviour log-prob the sampler recorded, the learner's score and the term count.

At an unmasking step the model predicts a distribution p over the codebook at every position; the sampler draws a
code at every still-masked position, keeps some and re-masks the rest (`policy.sampler`). A term is a per-position
quantity at a set of positions:

- ``code``: log p(the code drawn at the position) (at a kept position, the code it commits); recorded by the
  sampler as ``Trajectory.token_logprob`` at every position masked at the step's start;
- ``below``: log Σ_{v: p(v) < threshold} p(v), the threshold being the probability of the step's least confident
  kept code (the probability that the position's draw would have been less confident than every kept one);
  recorded as ``Trajectory.remask_logprob`` at the re-masked positions.

The definitions of the paper:

- ``candidate1``: ``code`` at the kept positions + ``below`` at the re-masked ones;
- ``candidate2``: ``code`` at the kept positions;
- ``ar_style``: ``code`` at every position masked at the step's start.

Both sides compute the terms with the same functions (`policy.transition`), from fp32 log-probabilities formed once
per row, so recorded and recomputed log-probs agree by construction (the on-policy ratio is 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from policy.family import MaskedModel
from policy.logprob import RowView, Rows, checked_steps, step_logprobs
from policy.trajectory import Trajectory
from policy.transition import code_logprob, remask_log_mass

from .registry import Registry

RECORDED = {"code": "token_logprob", "below": "remask_logprob"}     # term kind -> its field of the Trajectory


@dataclass
class StepLogprobs:
    logprob: torch.Tensor      # float [R] (or [B, S]) transition log-probability of each scored row
    num_terms: torch.Tensor    # float, same shape: how many positions contribute (for per-token averaging)


class Transition:
    """A transition definition: the terms it sums (kind, positions)."""
    name: ClassVar[str]
    terms: ClassVar[tuple[tuple[str, str], ...]]

    def behaviour(self, traj: Trajectory) -> torch.Tensor:
        """The behaviour policy's log-probability of each step, float [B, T], from what the sampler recorded."""
        masks = dict(zip(("masked", "kept", "remasked"), traj.step_masks()))
        out = None
        for kind, where in self.terms:
            term = (getattr(traj, RECORDED[kind]) * masks[where]).sum(-1)
            out = term if out is None else out + term
        return out

    def score(self, logprobs: torch.Tensor, view: RowView,
              cache: Optional[dict[tuple[str, str], torch.Tensor]] = None) -> StepLogprobs:
        """The current policy's log-probability [R] of each row from its fp32 log-probs [R, N, C]. `cache`: term
        sums shared between transitions scored from the same log-probs."""
        cache = {} if cache is None else cache
        out = None
        for kind, where in self.terms:
            if (kind, where) not in cache:
                cache[kind, where] = term_values(kind, where, logprobs, view).sum(-1)
            out = cache[kind, where] if out is None else out + cache[kind, where]
        return StepLogprobs(out, self.num_terms(view))

    def num_terms(self, view: RowView) -> torch.Tensor:
        """How many positions each row scores, float [R] (known from the record alone, before any forward pass)."""
        count = None
        for _, where in self.terms:
            c = view.positions(where).sum(-1)
            count = c if count is None else count + c
        return count.float()


def term_values(kind: str, where: str, logprobs: torch.Tensor, view: RowView) -> torch.Tensor:
    """A term's per-position values [R, N] (0 outside its positions)."""
    mask = view.positions(where)
    if kind == "code":
        return code_logprob(logprobs, torch.where(mask, view.drawn, -1))
    return torch.where(mask, remask_log_mass(logprobs, view.threshold), 0.0)


TRANSITIONS: Registry[Transition] = Registry("transition")


@TRANSITIONS.register("candidate1")
class Candidate1(Transition):
    terms = (("code", "kept"), ("below", "remasked"))


@TRANSITIONS.register("candidate2")
class Candidate2(Transition):
    terms = (("code", "kept"),)


@TRANSITIONS.register("ar_style")
class ArStyle(Transition):
    terms = (("code", "masked"),)


TRANSITION_NAMES: tuple[str, ...] = ("candidate1", "candidate2", "ar_style")


def transition(name: str) -> Transition:
    return TRANSITIONS.get(name)()


def behaviour_logprob(traj: Trajectory, name: str) -> torch.Tensor:
    """The recorded behaviour log-probability of each step under transition `name`, float [B, T]."""
    return transition(name).behaviour(traj)


def row_logprobs(model: MaskedModel, traj: Trajectory, rows: Rows, names: Sequence[str] = TRANSITION_NAMES,
                 prefix_reuse: bool = True) -> dict[str, StepLogprobs]:
    """The current policy's log-probabilities of `rows` for several transitions from one forward pass ([R] each).
    The trajectory and rows move to the model's device once."""
    device = next(model.parameters()).device
    traj, rows = traj.to(device), rows.to(device)
    logprobs = step_logprobs(model, traj, rows, prefix_reuse)             # fp32 [R, N, C], the only one
    view, cache = RowView.of(traj, rows), {}
    return {n: transition(n).score(logprobs, view, cache) for n in names}


def all_transition_logprobs(model: MaskedModel, traj: Trajectory, steps: Optional[torch.Tensor] = None,
                            prefix_reuse: bool = True,
                            names: Sequence[str] = TRANSITION_NAMES) -> dict[str, StepLogprobs]:
    """Per-step log-probabilities [B, S] of every sample of `traj` at `steps` (default all T) under `model`, for
    several transition definitions at once (one forward pass; e.g. to compare recorded and recomputed log-probs)."""
    steps = checked_steps(steps, traj.num_steps)
    b, s = traj.batch_size, steps.numel()
    out = row_logprobs(model, traj, Rows.grid(torch.arange(b), steps), names, prefix_reuse)
    return {n: StepLogprobs(v.logprob.view(b, s), v.num_terms.view(b, s)) for n, v in out.items()}


def transition_logprobs(model: MaskedModel, traj: Trajectory, name: str = "candidate1",
                        steps: Optional[torch.Tensor] = None, prefix_reuse: bool = True) -> StepLogprobs:
    """Per-step log-probability [B, S] of `traj`'s transitions under `model` (with or without autograd, as the
    caller chooses; guidance follows the trajectory's recorded weight)."""
    return all_transition_logprobs(model, traj, steps, prefix_reuse, (name,))[name]


@torch.no_grad()
def policy_step_logprobs(model: MaskedModel, traj: Trajectory, name: str,
                         steps: Optional[torch.Tensor] = None, prefix_reuse: bool = True) -> torch.Tensor:
    """The model's per-step transition log-probabilities [B, S] without gradients, in eval mode, on the CPU (e.g.
    to score with a reference policy)."""
    was_training = model.training
    model.eval()
    try:
        return transition_logprobs(model, traj, name, steps, prefix_reuse).logprob.float().cpu()
    finally:
        model.train(was_training)
