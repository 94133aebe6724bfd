"""What every role did when: a run's timeline as Chrome trace / Perfetto JSON (`timeline.json` in the run
directory; open it at https://ui.perfetto.dev or chrome://tracing), each role's busy share, and a picture.

Roles are processes in the trace (rollout, reward, learner, weight_sync, driver) and each actor is a lane in
its role (e.g. "worker 0"); the spans come from wall-clock times the actors report themselves (rollout calls,
reward calls, learner updates) and from the driver (weight syncs, evaluations, checkpoints). Gaps are idle time.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from policy.files import atomic_write, atomic_write_json

ROLES = ("rollout", "reward", "learner", "weight_sync", "driver")


@dataclass
class Span:
    role: str
    lane: str
    name: str
    start: float      # wall-clock seconds (time.time())
    end: float


class Timeline:
    def __init__(self, path: Optional[str | Path] = None):
        self.path = Path(path) if path is not None else None
        self.spans: list[Span] = []
        self._seen: set[tuple[str, str, float, float]] = set()

    def add(self, role: str, lane: str, name: str, start: float, end: float) -> None:
        """One span; the same (role, lane, start, end) is kept once (a reward call scores several groups)."""
        key = (role, lane, start, end)
        if key not in self._seen and end >= start:
            self._seen.add(key)
            self.spans.append(Span(role, lane, name, start, end))

    @contextmanager
    def measure(self, role: str, lane: str, name: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.add(role, lane, name, start, time.time())

    def window(self, since: Optional[float] = None) -> tuple[float, float]:
        spans = [s for s in self.spans if since is None or s.end > since]
        if not spans:
            return (0.0, 0.0)
        return (max(min(s.start for s in spans), since or -1e30), max(s.end for s in spans))

    def busy_share(self, since: Optional[float] = None) -> dict[str, float]:
        """Per role, the share of the wall time (from `since`, default the first span) in which at least one of
        its actors was busy."""
        t0, t1 = self.window(since)
        wall = max(t1 - t0, 1e-9)
        out = {}
        for role in ROLES:
            intervals = sorted((max(s.start, t0), s.end) for s in self.spans if s.role == role and s.end > t0)
            busy, cur_start, cur_end = 0.0, None, None
            for a, b in intervals:
                if cur_end is None or a > cur_end:
                    if cur_end is not None:
                        busy += cur_end - cur_start
                    cur_start, cur_end = a, b
                else:
                    cur_end = max(cur_end, b)
            if cur_end is not None:
                busy += cur_end - cur_start
            out[role] = busy / wall
        return out

    def trace(self) -> dict:
        """Chrome trace event format: complete events ("X") in microseconds from the first span."""
        t0 = min((s.start for s in self.spans), default=0.0)
        pids = {role: i + 1 for i, role in enumerate(ROLES)}
        lanes: dict[tuple[str, str], int] = {}
        events = []
        for role, pid in pids.items():
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": role}})
        for s in self.spans:
            pid = pids.get(s.role, len(pids) + 1)
            tid = lanes.setdefault((s.role, s.lane), len(lanes) + 1)
            events.append({"name": s.name, "cat": s.role, "ph": "X", "pid": pid, "tid": tid,
                           "ts": round((s.start - t0) * 1e6), "dur": round((s.end - s.start) * 1e6)})
        for (role, lane), tid in lanes.items():
            events.append({"name": "thread_name", "ph": "M", "pid": pids.get(role, len(pids) + 1), "tid": tid,
                           "args": {"name": lane}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write(self) -> Optional[Path]:
        if self.path is None:
            return None
        return atomic_write_json(self.path, self.trace(), indent=None)


def plot_timelines(traces: dict[str, dict], path: str | Path, window: Optional[tuple[float, float]] = None) -> Path:
    """Gantt charts of Chrome traces (one panel per trace, e.g. a synchronous and an asynchronous run), one row
    per lane, coloured by role; `window` = (start, end) seconds from each trace's start limits the panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"rollout": "tab:blue", "reward": "tab:orange", "learner": "tab:green", "weight_sync": "tab:red",
              "driver": "tab:gray"}
    fig, axes = plt.subplots(len(traces), 1, figsize=(12, 2.2 * len(traces)), squeeze=False)
    for ax, (title, trace) in zip(axes[:, 0], traces.items()):
        procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
        lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
                 if e.get("name") == "thread_name"}
        order = sorted(lanes, key=lambda k: (k[0], lanes[k]))
        rows = {k: i for i, k in enumerate(order)}
        for e in trace["traceEvents"]:
            if e.get("ph") != "X":
                continue
            start, dur = e["ts"] / 1e6, e["dur"] / 1e6
            if window is not None and (start > window[1] or start + dur < window[0]):
                continue
            ax.broken_barh([(start, dur)], (rows[(e["pid"], e["tid"])] - 0.4, 0.8),
                           facecolors=colors.get(procs.get(e["pid"]), "black"))
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([f"{procs.get(p, '?')}: {lanes[(p, t)]}" for p, t in order], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        if window is not None:
            ax.set_xlim(*window)
    from matplotlib.patches import Patch
    axes[0, 0].legend(handles=[Patch(color=c, label=r) for r, c in colors.items()], loc="upper right", fontsize=7,
                      ncol=len(colors))
    fig.tight_layout()
    path = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
