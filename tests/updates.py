"""The driver's side of an update for tests that drive a `Learner` directly: advantages, filtering and trained
steps from rewards (`cluster.advantages.plan_update`), with the driver's running tracker and step counter."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from cluster.advantages import PromptStatTracker, UpdatePlan, plan_update
from learner import GroupUpdate, Learner, LearnerConfig


class Planner:
    def __init__(self, config: LearnerConfig):
        self.config = config
        self.tracker = PromptStatTracker(config.running_buffer, config.running_min_count, config.adv_eps,
                                         config.adv_std_unbiased)
        self.step = 0

    def plan(self, trajs: Sequence[Any], rewards: Sequence[torch.Tensor], prompts: Sequence[str],
             behaviour: Optional[Sequence[torch.Tensor]] = None) -> UpdatePlan:
        plan = plan_update(trajs, rewards, prompts, self.config, trajs[0].num_steps, self.tracker,
                           [tr.meta.get("group_id", g) for g, tr in enumerate(trajs)], self.step)
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
    """A group update with the advantages given by hand (every sample kept, every step unless `steps`)."""
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    return GroupUpdate(traj, adv, torch.ones(adv.numel(), dtype=torch.bool),
                       torch.arange(traj.num_steps) if steps is None else steps, behaviour_logprob=behaviour)
