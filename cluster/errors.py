"""The failures a run reports as one line (the cause and the fix) instead of a traceback: bad weights, a damaged
checkpoint or metrics file, a full disk, an actor that could not start, a learner that died, a cluster too small.
Anything else is a bug and keeps its traceback."""
from __future__ import annotations


def run_failures() -> tuple[type[BaseException], ...]:
    """The error classes of such failures (imported here, not at the CLI's start, which stays fast)."""
    from learner.engine import NonFiniteUpdateError
    from policy.files import DiskFullError
    from policy.weights import CheckpointError
    from rewards.base import RewardError
    from rewards.pool import RewardPoolError
    from .driver import LearnerFailure
    from .metrics import MetricsFileError
    from .preflight import StartupError
    return (CheckpointError, DiskFullError, LearnerFailure, MetricsFileError, NonFiniteUpdateError, RewardError,
            RewardPoolError, StartupError)
