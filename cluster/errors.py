"""The failures a run reports as one line (the cause and the fix) instead of a traceback: bad weights, a damaged
checkpoint or metrics file, a full disk, an actor that could not start, a learner that died, a cluster too small.
Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import logging
import re
import time
import traceback
from pathlib import Path
from typing import Optional

from learner.engine import NonFiniteUpdateError
from policy.files import DiskFullError
from policy.weights import CheckpointError
from rewards.base import RewardError

from .metrics import MetricsFileError
from .preflight import StartupError


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped; `checkpoint` is where it can continue from (None: nothing saved yet)."""

    def __init__(self, step: int, checkpoint: Optional[str], consistent: bool = True):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint, self.consistent = step, checkpoint, consistent


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

ERROR_LOG = "errors.log"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain_text(text: str) -> str:
    """`text` without terminal colour codes (Ray colours the task names of its tracebacks)."""
    return _ANSI.sub("", text)


_CAUSE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")


def one_line(message: str) -> str:
    """A failure's message for the screen: one that carries a remote traceback (Ray puts the actor's into its
    error's text) becomes its own first clause and the traceback's last line, the cause (`errors.log` keeps the
    rest); other messages, including intentional lists of problems, stay as they are."""
    text = plain_text(message)
    if not re.search(r'^\s*File "', text, re.M):         # no traceback frames in it
        return text
    head = text.splitlines()[0]
    for marker in (": RayTaskError(", ": RayActorError(", ": ray::", " (RayTaskError("):
        if marker in head:
            head = head.split(marker, 1)[0]
            break
    causes = [m for line in text.splitlines() if (m := _CAUSE.match(line.strip()))]
    if not causes:
        return head
    kind, cause = causes[-1].group(1).rsplit(".", 1)[-1], causes[-1].group(2)
    return f"{head}: {kind}: {cause}"


def keep_remote_errors(output_dir: str | Path) -> Path:
    """Ray's "Unhandled error" reports (the traceback of an actor task whose failed result was never fetched,
    15-35 lines with colour codes, printed when the result is dropped) go to ``output_dir/errors.log`` instead of
    the screen: the run's own last line names the failure, and the file keeps the details."""
    path = Path(output_dir) / ERROR_LOG
    worker_logger = logging.getLogger("ray._private.worker")
    for f in worker_logger.filters:
        if isinstance(f, _ToErrorLog):
            f.path = path
            return path
    worker_logger.addFilter(_ToErrorLog(path))
    return path


class _ToErrorLog(logging.Filter):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Unhandled error"):
            return True
        append_error_log(self.path, plain_text(message))
        return False


def append_error_log(path: str | Path, text: str) -> None:
    """Add a time-stamped entry to the error log (best effort: a full disk must not hide the real error)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"----- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text.rstrip()}\n")
    except OSError:
        pass


def log_failure(output_dir: str | Path, err: BaseException) -> Path:
    """The full traceback of the run's final error (incl. the remote one Ray carries), colour codes removed."""
    path = Path(output_dir) / ERROR_LOG
    append_error_log(path, plain_text("".join(traceback.format_exception(err))))
    return path
