"""The driver side of the reward actors: a pool that spreads scoring calls over them and retries a failed call.

    pool = RewardPool.create(specs, num_actors=2, num_gpus=1,
                             decoder={"factory": "policy.factory:build_decoder", "cfg": policy_config})
    # the shapes world: decoder={"factory": "rewards.shapes.codebook:make_decoder"}
    out = pool.score_groups([{"codes": codes_g0, "prompts": [...], "metadata": [...]}, ...])
    out[0]["rewards"]   # float32 [G] for group 0; out[0]["components"]["hpsv2"] its raw HPS scores
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from rewards.base import RewardError
from rewards.worker import make_reward_actor_cls

log = logging.getLogger(__name__)


class RewardPoolError(RuntimeError):
    """A scoring call failed twice; ``reward`` names the failing reward (or the pool's rewards if unknown)."""

    def __init__(self, reward: str, message: str):
        super().__init__(message)
        self.reward = reward

    def __reduce__(self):
        return (type(self), (self.reward, str(self)))


@dataclass
class PendingScore:
    """A submitted call: the Ray object ref, which actor runs it, and its arguments (kept for a retry)."""
    ref: Any
    actor: int
    items: Sequence[Mapping[str, Any]]
    trajectories: Sequence[Any] = ()


def _failed_reward(err: BaseException) -> Optional[str]:
    """The reward named by a (Ray-wrapped) RewardError, if any."""
    for e in (err, getattr(err, "cause", None), getattr(err, "__cause__", None)):
        if isinstance(e, RewardError) or (e is not None and hasattr(e, "reward") and isinstance(e.reward, str)):
            return e.reward
    return None


class RewardPool:
    """Driver side: round-robins scoring calls over reward actors; retries a failed call once on the next actor
    (the same one, once Ray has restarted it, when the pool has only one) and then raises RewardPoolError naming
    the reward. `timeout_s` bounds each wait for a result (None: no limit)."""

    def __init__(self, actors: Sequence[Any], labels: Optional[Sequence[str]] = None,
                 timeout_s: Optional[float] = None, restart_timeout_s: float = 120.0):
        if not actors:
            raise ValueError("RewardPool needs at least one actor")
        self.actors = list(actors)
        self.labels = list(labels) if labels is not None else None
        self.timeout_s = timeout_s
        self.restart_timeout_s = restart_timeout_s
        self._next = itertools.count()
        self.retries = 0
        self.pids: dict[int, int] = {}     # actor index -> process id last seen (a restart changes it)

    @classmethod
    def create(cls, rewards: Sequence[Mapping[str, Any]], num_actors: int = 1,
               decoder: Mapping[str, Any] | str | None = None, batch_size: int = 32, num_gpus: float = 0,
               num_cpus: float = 1, max_restarts: int = 1, device: Optional[str] = None,
               timeout_s: Optional[float] = None, **ray_options: Any) -> "RewardPool":
        """Start `num_actors` reward actors with the same rewards and decoder."""
        actor_cls = make_reward_actor_cls(num_gpus, num_cpus, max_restarts, **ray_options)
        actors = [actor_cls.remote(list(rewards), decoder, batch_size, device) for _ in range(num_actors)]
        labels = [r.get("label") or r["name"] for r in rewards]
        return cls(actors, labels, timeout_s)

    def _names(self) -> str:
        return ", ".join(self.labels) if self.labels else "the pool's rewards"

    def submit(self, items: Sequence[Mapping[str, Any]], trajectories: Sequence[Any] = (),
               actor: Optional[int] = None) -> PendingScore:
        """Start scoring `items` on the next actor (round robin) without waiting. `trajectories`: object
        references of the groups' trajectories (see `RewardWorker.score_groups`): the call starts when they
        exist, so a rollout's groups can be submitted as soon as the rollout is dispatched."""
        i = next(self._next) % len(self.actors) if actor is None else actor % len(self.actors)
        return PendingScore(self.actors[i].score_groups.remote(items, *trajectories), i, items, tuple(trajectories))

    def result(self, pending: PendingScore) -> list[dict[str, Any]]:
        """Wait for a submitted call; on failure retry it once on the next actor, then raise RewardPoolError."""
        import ray
        try:
            return ray.get(pending.ref, timeout=self.timeout_s)
        except Exception as first:  # RayTaskError (an exception in a reward), RayActorError (actor died), timeout
            self.retries += 1
            target = (pending.actor + 1) % len(self.actors)
            print(f"[maskgrpo] reward call failed on actor {pending.actor} ({type(first).__name__}: "
                  f"{str(first).splitlines()[0] if str(first) else ''}); retrying once on actor {target}", flush=True)
            self._wait_ready(target)
            retry = self.submit(pending.items, pending.trajectories, actor=target)
            try:
                return ray.get(retry.ref, timeout=self.timeout_s)
            except Exception as second:
                name = _failed_reward(second) or _failed_reward(first) or self._names()
                raise RewardPoolError(name, f"reward {name} failed twice (actor {pending.actor}, then actor "
                                            f"{retry.actor}): {type(second).__name__}: {second}") from second

    def _wait_ready(self, i: int) -> None:
        """Wait (up to ``restart_timeout_s``) while actor `i` is restarting after its process died."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError
        deadline = time.monotonic() + self.restart_timeout_s
        while time.monotonic() < deadline:
            try:
                pid = ray.get(self.actors[i].ping.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                self.note_pid(i, pid)
                return
            except (ActorUnavailableError, GetTimeoutError):
                time.sleep(0.2)
            except Exception:   # dead for good (restarts exhausted) or broken: let the retry report it
                return

    def note_pid(self, i: int, pid: int) -> None:
        """Record actor `i`'s process id (from `ping`); a new one means Ray restarted it: say so."""
        old = self.pids.get(i)
        if old is not None and old != pid:
            print(f"[maskgrpo] reward actor {i} was restarted (pid {old} -> {pid})", flush=True)
        self.pids[i] = pid

    def score_groups(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Score groups on one actor (blocking, with one retry)."""
        return self.result(self.submit(items))

    def map(self, batches: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[dict[str, Any]]]:
        """Score several lists of groups concurrently, one call per list spread round robin over the actors."""
        pending = [self.submit(b) for b in batches]
        return [self.result(p) for p in pending]

    def stats(self) -> list[dict[str, Any]]:
        import ray
        return ray.get([a.stats.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []
