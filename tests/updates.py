"""The driver's side of an update for tests that drive a `Learner` directly: the algorithm's plan (advantages,
filtering, the rows that train) from rewards, with the driver's estimator state and step counter; and the split
of a test's keyword settings into the learner's and the algorithm's config sections."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional, Sequence

import torch

from algorithm.advantages import GroupOutcome
from algorithm.config import AlgorithmConfig
from algorithm.plan import Planner as AlgorithmPlanner, UpdatePlan
from learner import GroupUpdate, Learner, LearnerConfig

ALGORITHM_KEYS = {f.name for f in fields(AlgorithmConfig)}


def configs(**kw: Any) -> tuple[LearnerConfig, AlgorithmConfig]:
    """(LearnerConfig, AlgorithmConfig) from one set of keywords, each to the section that has it."""
    return (LearnerConfig(**{k: v for k, v in kw.items() if k not in ALGORITHM_KEYS}),
            AlgorithmConfig(**{k: v for k, v in kw.items() if k in ALGORITHM_KEYS}))


class Planner:
    """`algorithm.plan.Planner` over trajectories held in the test, with the step counter the driver keeps."""

    def __init__(self, config: AlgorithmConfig | tuple[LearnerConfig, AlgorithmConfig]):
        self.config = config[1] if isinstance(config, tuple) else config
        self.planner = AlgorithmPlanner(self.config)
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return self.planner.state_dict()

    def load_state_dict(self, state) -> None:
        self.planner.load_state_dict(state)

    @property
    def tracker(self):
        """The running estimator's per-prompt tracker (`algorithm.advantage: running`)."""
        return self.planner.estimator.tracker

    def plan(self, trajs: Sequence[Any], rewards: Sequence[torch.Tensor], prompts: Sequence[str],
             behaviour: Optional[Sequence[torch.Tensor]] = None) -> UpdatePlan:
        outcomes = [GroupOutcome(tr.meta.get("group_id", g), p, r, tr.num_steps, None,
                                 {"self_certainty": tr.self_certainty} if tr.self_certainty is not None else None)
                    for g, (tr, r, p) in enumerate(zip(trajs, rewards, prompts))]
        plan = self.planner.plan(outcomes, list(trajs), self.step)
        if behaviour is not None:
            by_id = {tr.meta.get("group_id", g): b for g, (tr, b) in enumerate(zip(trajs, behaviour))}
            for g in plan.groups:
                g.behaviour_logprob = by_id[g.group_id]
        self.step += 1
        return plan

    def train(self, learner: Learner, trajs, rewards, prompts, behaviour=None) -> dict[str, float]:
        """One update; the metrics as the driver logs them (learner figures + the plan's counts)."""
        plan = self.plan(trajs, rewards, prompts, behaviour)
        return {**learner.train_step(plan.groups).metrics(), **plan.metrics()}


def given(traj, advantages: torch.Tensor, behaviour: Optional[torch.Tensor] = None,
          steps: Optional[torch.Tensor] = None) -> GroupUpdate:
    """A group update with the advantages given by hand (every sample trains, every step unless `steps`)."""
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    return GroupUpdate.rectangle(traj, adv, torch.ones(traj.batch_size, dtype=torch.bool),
                                 torch.arange(traj.num_steps) if steps is None else steps, traj.num_steps,
                                 behaviour_logprob=behaviour)
