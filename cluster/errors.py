"""The failures a run reports as one line (the cause and the fix) instead of a traceback: bad weights, a damaged
checkpoint or metrics file, a full disk, an actor that could not start, a learner that died, a cluster too small.
Anything else is a bug and keeps its traceback."""
from __future__ import annotations

from learner.engine import NonFiniteUpdateError
from policy.files import DiskFullError
from policy.weights import CheckpointError
from rewards.base import RewardError

from .metrics import MetricsFileError
from .preflight import StartupError


class LearnerFailure(RuntimeError):
    """A learner rank died: the run cannot go on (its optimizer state is gone); resume from the last checkpoint."""


class FleetError(RuntimeError):
    """Too few rollout workers (or reward actors) are alive and none could start within the configured wait."""


class RewardGroupError(RuntimeError):
    """A scoring call failed twice; ``reward`` names the failing reward (or the group's rewards if unknown)."""

    def __init__(self, reward: str, message: str):
        super().__init__(message)
        self.reward = reward

    def __reduce__(self):
        return (type(self), (self.reward, str(self)))


RUN_FAILURES: tuple[type[BaseException], ...] = (CheckpointError, DiskFullError, FleetError, LearnerFailure,
                                                 MetricsFileError,
                                                 NonFiniteUpdateError, RewardError, RewardGroupError, StartupError)
