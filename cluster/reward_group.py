"""The reward role: reward actors (`rewards.worker.RewardWorker`) that decode and score groups in batches, and
the driver's side of them, which spreads scoring calls over the actors and retries a failed call once.

    group = RewardGroup.from_config(backend, cfg)            # cluster.num_reward_actors actors
    pending = group.submit(items, trajectory_futures)        # starts when the trajectories exist
    results = group.result(pending)                          # list[RewardResult], one per group
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig

from rewards.base import RewardError
from rewards.worker import RewardResult, RewardWorker

from .backend import ActorSpec, Backend
from .config import plain, reward_specs, role_device, section
from .errors import RewardGroupError


@dataclass
class PendingScore:
    """A submitted call: its future, which actor runs it, and its arguments (kept for a retry)."""
    future: Any
    actor: int
    items: Sequence[Mapping[str, Any]]
    trajectories: Sequence[Any] = ()


def _failed_reward(err: BaseException) -> Optional[str]:
    """The reward named by a (possibly Ray-wrapped) RewardError, if any."""
    for e in (err, getattr(err, "cause", None), getattr(err, "__cause__", None)):
        if isinstance(e, RewardError) or (e is not None and hasattr(e, "reward") and isinstance(e.reward, str)):
            return e.reward
    return None


def decoder_spec(cfg: DictConfig) -> dict[str, Any]:
    """The reward actors decode codes with the policy's image decoder (MAGVIT-v2 or the shapes world)."""
    return {"factory": "policy.factory:build_decoder", "cfg": section(cfg, "policy"),
            "device": role_device(cfg.cluster.reward_gpus)}


class RewardGroup:
    """Round-robins scoring calls over the reward actors; retries a failed call once on the next actor (the same
    one, once the backend has restarted it, when there is only one), then raises RewardGroupError naming the
    reward. `timeout_s` bounds each wait for a result (None: no limit)."""

    def __init__(self, backend: Backend, actors: Sequence[Any], labels: Optional[Sequence[str]] = None,
                 timeout_s: Optional[float] = None, restart_timeout_s: float = 120.0):
        if not actors:
            raise ValueError("a RewardGroup needs at least one actor")
        self.backend = backend
        self.actors = list(actors)
        self.labels = list(labels) if labels is not None else None
        self.timeout_s = timeout_s
        self.restart_timeout_s = restart_timeout_s
        self._next = itertools.count()
        self.retries = 0
        self.pids: dict[int, int] = {}     # actor index -> process id last seen (a restart changes it)

    @classmethod
    def create(cls, backend: Backend, rewards: Sequence[Mapping[str, Any]], num_actors: int = 1,
               decoder: Mapping[str, Any] | str | None = None, batch_size: int = 32, num_gpus: float = 0,
               num_cpus: float = 1, max_restarts: int = 1, device: Optional[str] = None,
               timeout_s: Optional[float] = None, resources: Optional[Mapping[str, float]] = None,
               node_labels: Optional[Mapping[str, str]] = None, restart_timeout_s: float = 120.0) -> "RewardGroup":
        """Start `num_actors` reward actors with the same rewards and decoder (on nodes with `resources` /
        `node_labels`, if given). Calls run in the order their trajectories arrive, not the order they were
        submitted (out-of-order actors)."""
        spec = ActorSpec(RewardWorker, (list(rewards), decoder, batch_size, device), num_cpus=num_cpus,
                         num_gpus=num_gpus, max_restarts=max_restarts, out_of_order=True,
                         resources=dict(resources or {}), labels=dict(node_labels or {}))
        labels = [r.get("label") or r["name"] for r in rewards]
        return cls(backend, [backend.start(spec) for _ in range(num_actors)], labels, timeout_s, restart_timeout_s)

    @classmethod
    def from_config(cls, backend: Backend, cfg: DictConfig, specs: Any = None) -> "RewardGroup":
        """The run's reward actors (`cfg.rewards`, or other `specs` such as the evaluation's)."""
        c = cfg.cluster
        return cls.create(backend, reward_specs(cfg, cfg.rewards if specs is None else specs),
                          num_actors=c.num_reward_actors, decoder=decoder_spec(cfg), num_gpus=c.reward_gpus,
                          num_cpus=c.cpus_per_actor, max_restarts=c.max_restarts, device=role_device(c.reward_gpus),
                          resources=plain(c.reward_resources), node_labels=plain(c.reward_labels),
                          restart_timeout_s=c.reward_restart_s)

    def _names(self) -> str:
        return ", ".join(self.labels) if self.labels else "the group's rewards"

    def ready(self) -> list[Any]:
        """One future per actor: its process id once it has built its rewards."""
        return [self.backend.call(a, "ping") for a in self.actors]

    def submit(self, items: Sequence[Mapping[str, Any]], trajectories: Sequence[Any] = (),
               actor: Optional[int] = None) -> PendingScore:
        """Start scoring `items` on the next actor (round robin) without waiting. `trajectories`: futures of the
        groups' trajectories (item i is scored on ``trajectories[i].final_codes``): the call starts when they
        exist, so a rollout's groups can be submitted as soon as the rollout is dispatched."""
        i = next(self._next) % len(self.actors) if actor is None else actor % len(self.actors)
        future = self.backend.call(self.actors[i], "score_groups", items, *trajectories)
        return PendingScore(future, i, items, tuple(trajectories))

    def result(self, pending: PendingScore) -> list[RewardResult]:
        """Wait for a submitted call; on failure retry it once on the next actor, then raise RewardGroupError."""
        try:
            return self.backend.get(pending.future, timeout=self.timeout_s)
        except Exception as first:  # an exception in a reward, a dead actor, a timeout
            self.retries += 1
            target = (pending.actor + 1) % len(self.actors)
            print(f"[maskgrpo] reward call failed on actor {pending.actor} ({type(first).__name__}: "
                  f"{str(first).splitlines()[0] if str(first) else ''}); retrying once on actor {target}", flush=True)
            self._wait_ready(target)
            retry = self.submit(pending.items, pending.trajectories, actor=target)
            try:
                return self.backend.get(retry.future, timeout=self.timeout_s)
            except Exception as second:
                name = _failed_reward(second) or _failed_reward(first) or self._names()
                raise RewardGroupError(name, f"reward {name} failed twice (actor {pending.actor}, then actor "
                                             f"{retry.actor}): {type(second).__name__}: {second}") from second

    def _wait_ready(self, i: int) -> None:
        """Wait (up to ``restart_timeout_s``) while actor `i` is restarting after its process died."""
        deadline = time.monotonic() + self.restart_timeout_s
        while time.monotonic() < deadline:
            try:
                pid = self.backend.get(self.backend.call(self.actors[i], "ping"),
                                       timeout=max(deadline - time.monotonic(), 0.1))
                self.note_pid(i, pid)
                return
            except self.backend.dead_errors:    # dead for good (restarts used up): let the retry report it
                return
            except Exception:                   # still restarting, or the wait timed out
                time.sleep(0.2)

    def note_pid(self, i: int, pid: int) -> None:
        """Record actor `i`'s process id (from `ping`); a new one means it was restarted: say so."""
        old = self.pids.get(i)
        if old is not None and old != pid:
            print(f"[maskgrpo] reward actor {i} was restarted (pid {old} -> {pid})", flush=True)
        self.pids[i] = pid

    def lane(self, pid: Optional[int]) -> str:
        """The timeline lane of the reward actor whose process scored a group."""
        by_pid = {p: i for i, p in self.pids.items()}
        return f"actor {by_pid[pid]}" if pid in by_pid else f"actor pid {pid}"

    def score_groups(self, items: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        """Score groups on one actor (blocking, with one retry)."""
        return self.result(self.submit(items))

    def map(self, batches: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[RewardResult]]:
        """Score several lists of groups concurrently, one call per list spread round robin over the actors."""
        pending = [self.submit(b) for b in batches]
        return [self.result(p) for p in pending]

    def stats(self) -> list[dict[str, Any]]:
        return self.backend.get([self.backend.call(a, "stats") for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            self.backend.kill(a)
        self.actors = []
