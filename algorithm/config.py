"""The `algorithm` config section: every decision of Mask-GRPO (the learner's section keeps the optimizer and the
execution). Defaults follow the paper / the authors' release."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Optional

# keys that lived in the `learner` section before the algorithm had one: a config that still sets them is told
LEGACY_LEARNER_KEYS = {"transition": "transition", "clip_low": "clip_low", "clip_high": "clip_high",
                       "kl_beta": "kl_beta", "loss_average": "loss_average", "reduction": "selector",
                       "reduction_k": "select_k", "reduction_n": "select_n", "advantage": "advantage",
                       "stale_logprobs": "stale_logprobs", "adv_eps": "adv_eps", "adv_std_unbiased": "adv_std_unbiased",
                       "running_buffer": "running_buffer", "running_min_count": "running_min_count",
                       "filter_min_std": "filter_min_std", "filter_top_bottom": "filter_top_bottom",
                       "reward_name": "reward_name", "seed": "seed"}


class LossAverage(StrEnum):
    sequence = "sequence"
    token = "token"


class StaleLogprobs(StrEnum):
    """What the importance ratio of a stale trajectory (sampled with older weights, `cluster.max_staleness` > 0)
    is taken against. ``recompute``: the learner's own log-probs at the start of the update (the proximal policy,
    as verl and AReaL recompute "old" log-probs), one extra forward pass without gradients over the stale rows.
    ``recorded``: the behaviour log-probs the rollout worker recorded (importance weights back to the sampling
    policy); on this project's default world it stalls learning (docs/experiments.md)."""
    recompute = "recompute"
    recorded = "recorded"


@dataclass
class TreeConfig:
    """Group trees (`algorithm.tree`): the steps at which a group branches and the factor of each; the factors'
    product is the group size. Empty: G independent samples, as the paper."""
    branch_steps: list[int] = field(default_factory=list)
    factors: list[int] = field(default_factory=list)


@dataclass
class AlgorithmConfig:
    """Mask-GRPO's decisions. Per trained (sample, step) row with advantage A (see `algorithm.losses`):
    ``loss_row = -min(A·r, A·clamp(r, clip_low, clip_high)) + kl_beta·k3(ref, cur)``, r = exp(cur − behaviour).

    ``loss_average``: ``"sequence"`` (the authors'): each row is scaled by 1/T (T: the sampler's steps, even when
    only some train) and the sum averaged over the trajectories with a trained row in the global batch;
    ``"token"``: the rows' losses summed and divided by the scored positions (kept tokens for candidate 2, masked
    positions for candidate 1 and AR-style) of the global batch.
    """
    # ----- the step's transition and the policy loss ---------------------------------------------------------
    transition: str = "candidate1"          # algorithm.transitions: candidate1 | candidate2 | ar_style
    loss: str = "clipped"                   # algorithm/losses/: clipped | reinforce
    clip_low: float = 0.9                   # ratio clamp range [clip_low, clip_high] (authors: [0.9, 1.2])
    clip_high: float = 1.2
    kl_beta: float = 0.0                    # k3 KL to a frozen reference policy; 0 = no reference model at all
    loss_average: LossAverage = LossAverage.sequence
    stale_logprobs: StaleLogprobs = StaleLogprobs.recompute
    # ----- credit -------------------------------------------------------------------------------------------
    advantage: str = "group"                # algorithm/advantages/: group | running | tree
    adv_eps: float = 1e-4
    adv_std_unbiased: bool = True           # torch.std's default (Bessel's correction) for the group std
    running_buffer: int = 64                # "running": how many past rewards per prompt are remembered
    running_min_count: int = 2              # "running": below this history length the group's own stats are used
    filter_min_std: float = 0.0             # drop groups whose reward std < this (0 = keep every group)
    filter_top_bottom: int = 0              # keep only the top k and bottom k samples of each group (0 = all)
    reward_name: str = "reward"             # names the reward in error messages
    # ----- which (sample, step) rows train (the sampler still runs all T steps) ----------------------------------
    selector: str = "all"                   # algorithm/selectors/: all | first_k | random_k | every_n |
                                            # after_branch | entropy | certainty_change
    select_k: int = 25                      # steps per sample for the *_k and informed selectors
    select_n: int = 2                       # every_n: steps 0, n, 2n, ...
    seed: int = 0                           # seeds random_k (with the training step and group id)
    # ----- how a group is sampled ---------------------------------------------------------------------------------
    tree: TreeConfig = field(default_factory=TreeConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tree, dict):
            self.tree = TreeConfig(**self.tree)
        from .losses import LOSSES
        from .selectors import SELECTORS
        from .transitions import TRANSITIONS
        from .advantages import ESTIMATORS
        problems = []
        for key, registry in (("transition", TRANSITIONS), ("loss", LOSSES), ("advantage", ESTIMATORS),
                              ("selector", SELECTORS)):
            try:
                registry.get(getattr(self, key))
            except ValueError as e:
                problems.append(f"algorithm.{e}")
        for name, kind in (("loss_average", LossAverage), ("stale_logprobs", StaleLogprobs)):
            try:
                setattr(self, name, kind(getattr(self, name)))
            except ValueError:
                problems.append(f"algorithm.{name} must be one of {[k.value for k in kind]}, not {getattr(self, name)!r}")
        checks = [
            (0.0 < self.clip_low <= 1.0 <= self.clip_high, "need 0 < algorithm.clip_low <= 1 <= algorithm.clip_high"),
            (math.isfinite(self.kl_beta) and self.kl_beta >= 0.0, "algorithm.kl_beta must be a finite number >= 0"),
            (self.select_k >= 1 and self.select_n >= 1, "algorithm.select_k and select_n must be >= 1"),
            (self.adv_eps > 0.0, "algorithm.adv_eps must be > 0"),
            (self.filter_min_std >= 0.0 and self.filter_top_bottom >= 0, "algorithm filters must be >= 0"),
            (self.running_buffer >= 1 and self.running_min_count >= 1,
             "algorithm.running_buffer and running_min_count must be >= 1"),
        ]
        problems += [message for ok, message in checks if not ok]
        try:
            tree = self.tree_spec
        except ValueError as e:
            problems.append(f"algorithm.tree: {e}")
        else:
            if tree is not None and self.advantage != "tree":
                problems.append("algorithm.tree samples groups as trees: their credit is per depth, set "
                                "algorithm.advantage=tree")
            if tree is None and self.advantage == "tree":
                problems.append("algorithm.advantage=tree needs a group tree: set algorithm.tree.branch_steps and "
                                "algorithm.tree.factors (e.g. [4] and [16])")
        if problems:
            raise ValueError("\n  - ".join(problems))

    @property
    def tree_spec(self):
        from .tree import TreeSpec
        return TreeSpec.of(self.tree)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (enums as strings), for checkpoints."""
        d = asdict(self)
        return {k: str(v) if isinstance(v, StrEnum) else v for k, v in d.items()}


def legacy_key_problem(learner_keys: list[str]) -> Optional[str]:
    """The message for `learner.<key>` settings that are the algorithm's now (None when there are none)."""
    moved = [k for k in learner_keys if k in LEGACY_LEARNER_KEYS]
    if not moved:
        return None
    names = ", ".join(f"learner.{k} -> algorithm.{LEGACY_LEARNER_KEYS[k]}" for k in moved)
    return f"these keys moved to the algorithm section: {names}"
