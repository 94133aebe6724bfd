"""The one wait helper (cluster.waiting): deadline, liveness watch, progress line; and that the control plane has
no other deadline loop."""
import ast
from pathlib import Path

import pytest

from cluster.waiting import Wait, wait_all, wait_any


class Clockwork:
    """A backend whose futures finish after a number of polls (never: None); `wait` records its timeouts."""

    def __init__(self, polls_to_finish):
        self.left = dict(polls_to_finish)
        self.timeouts = []

    def wait(self, futures, timeout=None):
        self.timeouts.append(timeout)
        for f in futures:
            if self.left[f] is not None:
                self.left[f] -= 1
        done = [f for f in futures if self.left[f] is not None and self.left[f] <= 0]
        return done, [f for f in futures if f not in done]

    def get(self, f):
        if f == "bad":
            raise ValueError("the call raised")
        return f


def test_wait_all_polls_watches_between_polls_and_stops_at_the_deadline(capsys):
    backend, watched = Clockwork({"a": 1, "b": 3}), []
    wait_all(backend, ["a", "b"], Wait("a and b", poll_s=0.01, watch=lambda: watched.append(1)))
    assert len(backend.timeouts) == 3 and len(watched) == 2          # the watch runs before every poll but the first
    assert set(backend.timeouts) == {0.01}

    def stuck(elapsed):
        return TimeoutError(f"gave up after {elapsed:.2f} s: raise the limit")
    with pytest.raises(TimeoutError, match="raise the limit"):
        wait_all(Clockwork({"c": None}), ["c"], Wait("c", poll_s=0.01, limit_s=0.05, expired=stuck))
    # a dead dependency ends the wait at once, through the watch
    with pytest.raises(RuntimeError, match="learner rank 0 is dead"):
        wait_all(Clockwork({"c": None}), ["c"], Wait("c", poll_s=0.01, watch=lambda: (_ for _ in ()).throw(
            RuntimeError("learner rank 0 is dead"))))
    # fail_fast: a finished call that raised fails the wait before the others finish
    with pytest.raises(ValueError, match="the call raised"):
        wait_all(Clockwork({"bad": 1, "c": None}), ["bad", "c"], Wait("x", poll_s=0.01, limit_s=5), fail_fast=True)


def test_wait_any_quiet_expiry_and_the_progress_line(capsys):
    assert wait_any(Clockwork({"a": 2, "b": None}), ["a", "b"], Wait("a", poll_s=0.01)) == ["a"]
    assert wait_any(Clockwork({"b": None}), ["b"], Wait("b", poll_s=0.01, limit_s=0.03)) == []   # no expired: quiet
    backend = Clockwork({"b": None})
    wait_any(backend, ["b"], Wait("the rollouts of step 3", poll_s=0.01, limit_s=0.05, say_every_s=0.0))
    assert "still waiting for the rollouts of step 3" in capsys.readouterr().out
    assert backend.timeouts[-1] <= 0.01 and backend.timeouts[0] == 0.01    # never past the deadline
    # a zero limit still looks once
    assert wait_any(Clockwork({"a": 1}), ["a"], Wait("a", poll_s=1.0, limit_s=0.0)) == ["a"]


def test_the_control_plane_has_no_other_deadline_loop():
    """Waits in the driver's roles go through cluster.waiting: no `while` loop elsewhere reads a clock (the cluster
    watchdog thread in cluster/runtime.py is a heartbeat, not a wait, and is the one exception)."""
    root = Path(__file__).resolve().parents[1]
    clocks = {"monotonic", "time", "perf_counter"}
    offenders = []
    for path in sorted((root / "cluster").glob("*.py")) + sorted((root / "actors").glob("*.py")):
        if path.name in ("waiting.py", "runtime.py"):
            continue
        for loop in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.While)):
            if any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr in clocks
                   for c in ast.walk(loop)):
                offenders.append(f"{path.name}:{loop.lineno}")
    assert offenders == []
