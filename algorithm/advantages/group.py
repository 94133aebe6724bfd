"""`algorithm.advantage: group`: each sample's reward normalised within its group, (r − mean)/(std + eps), for
every step of the sample (the paper's GRPO credit)."""
from __future__ import annotations

from typing import Sequence

from . import ESTIMATORS, AdvantageEstimator, GroupCredit, GroupOutcome, every_row, normalised, reward_std


@ESTIMATORS.register("group")
class GroupAdvantage(AdvantageEstimator):
    def credit(self, groups: Sequence[GroupOutcome]) -> list[GroupCredit]:
        c = self.config
        return [GroupCredit(normalised(g.rewards, c.adv_eps, c.adv_std_unbiased).float(),
                            every_row(g.rewards.numel(), g.num_steps), reward_std(g.rewards, c.adv_std_unbiased))
                for g in groups]
