"""The one way the driver waits: a deadline, a liveness watch and a message, in one place.

Every wait on actors (start-up, rollouts, rewards, the learner, the weight hand-over, joining workers) polls in
steps of `cluster.poll_s`: between polls it calls `watch()` (which raises when a role it depends on is gone: a dead
learner rank is noticed within seconds even while the others block in a collective), prints a line every
`say_every_s` so a long wait is never silent, and past `limit_s` raises the error `expired(elapsed)` builds, which
names the cause and the fix. Without `expired` the wait just ends at the limit (the caller decides).

    for timeout in Wait("the update", poll_s=1.0, watch=learner.check_alive).polls():
        done, _ = backend.wait(futures, timeout=timeout)
        if len(done) == len(futures):
            break
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence


@dataclass
class Wait:
    what: str                                           # for the progress line: "the rollouts of step 3"
    poll_s: float
    limit_s: Optional[float] = None                     # None: no deadline
    watch: Optional[Callable[[], None]] = None          # raises when something waited on can no longer answer
    expired: Optional[Callable[[float], BaseException]] = None   # the error at the deadline; None: stop quietly
    say_every_s: Optional[float] = None                 # a "still waiting" line this often

    def polls(self) -> Iterator[float]:
        """The timeout of each successive poll. Before every poll but the first: the watch, the deadline and the
        progress line. The first poll gets at most the whole limit, so a wait with limit 0 still looks once."""
        t0, said, first = time.monotonic(), 0.0, True
        while True:
            elapsed = time.monotonic() - t0
            if not first:
                if self.watch is not None:
                    self.watch()
                if self.limit_s is not None and elapsed >= self.limit_s:
                    if self.expired is None:
                        return
                    raise self.expired(elapsed)
                if self.say_every_s is not None and elapsed - said >= self.say_every_s:
                    said = elapsed
                    print(f"[maskgrpo] still waiting for {self.what} ({elapsed:.0f} s)", flush=True)
            first = False
            left = float("inf") if self.limit_s is None else max(0.0, self.limit_s - elapsed)
            yield min(self.poll_s, left)


def wait_all(backend: Any, futures: Sequence[Any], wait: Wait, fail_fast: bool = False) -> None:
    """Until every future is done. `fail_fast`: a finished call that raised raises now, not after the others."""
    futures = list(futures)
    for timeout in wait.polls():
        done, _ = backend.wait(futures, timeout=timeout)
        if len(done) == len(futures):
            return
        if fail_fast:
            for f in done:
                backend.get(f)


def wait_any(backend: Any, futures: Sequence[Any], wait: Wait) -> list[Any]:
    """The futures done once at least one is (all that are done by then); [] if the wait ran out quietly."""
    futures = list(futures)
    for timeout in wait.polls():
        done, _ = backend.wait(futures, timeout=timeout)
        if done:
            return list(done)
    return []
