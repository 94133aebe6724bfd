"""`algorithm.advantage: running`: rewards normalised by their prompt's running statistics, as image-RL trainers
keep them (flow_grpo's per-prompt tracker). Each prompt remembers its last `running_buffer` rewards; a group's
advantages are its rewards normalised by the mean and std of that history (which includes the group itself). With
fewer than `running_min_count` rewards remembered, the group's own statistics are used."""
from __future__ import annotations

from collections import deque
from typing import Any, Optional, Sequence

import torch

from . import (ESTIMATORS, AdvantageEstimator, GroupCredit, GroupOutcome, every_row, normalised, reward_std)


class PromptStatTracker:
    def __init__(self, buffer_size: int = 64, min_count: int = 2, eps: float = 1e-4, unbiased: bool = True):
        self.buffer_size, self.min_count, self.eps, self.unbiased = buffer_size, min_count, eps, unbiased
        self.history: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Sequence[torch.Tensor]) -> None:
        for prompt, r in zip(prompts, rewards):
            buf = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(float(x) for x in torch.as_tensor(r).flatten().tolist())

    def stats(self, prompt: str) -> Optional[tuple[float, float, int]]:
        """(mean, std, count) of the prompt's history, or None if too short."""
        buf = self.history.get(prompt)
        if not buf or len(buf) < self.min_count:
            return None
        h = torch.tensor(list(buf), dtype=torch.float64)
        return float(h.mean()), reward_std(h, self.unbiased), len(buf)

    def advantages(self, prompt: str, r: torch.Tensor) -> torch.Tensor:
        s = self.stats(prompt)
        if s is None:
            return normalised(r, self.eps, self.unbiased)
        mean, std, _ = s
        return (r - mean) / (std + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "eps": self.eps,
                "unbiased": self.unbiased, "history": {p: list(b) for p, b in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.eps, self.unbiased = float(state["eps"]), bool(state["unbiased"])
        self.history = {p: deque(b, maxlen=self.buffer_size) for p, b in state["history"].items()}


@ESTIMATORS.register("running")
class RunningAdvantage(AdvantageEstimator):
    def __init__(self, config):
        super().__init__(config)
        self.tracker = PromptStatTracker(config.running_buffer, config.running_min_count, config.adv_eps,
                                         config.adv_std_unbiased)

    def credit(self, groups: Sequence[GroupOutcome]) -> list[GroupCredit]:
        self.tracker.update([g.prompt for g in groups], [g.rewards for g in groups])
        return [GroupCredit(self.tracker.advantages(g.prompt, g.rewards).float(),
                            every_row(g.rewards.numel(), g.num_steps),
                            reward_std(g.rewards, self.config.adv_std_unbiased)) for g in groups]

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)
