"""The reward role: reward actors (`rewards.worker.RewardWorker`) that decode and score groups in batches, and
the driver's side of them, which spreads scoring calls over the actors and retries a failed call once. Rewards
whose spec carries a Ray `runtime_env` get actor pools of their own, started in that environment.

    group = RewardGroup.from_config(backend, cfg)            # cluster.num_reward_actors actors per environment
    pending = group.submit(items, trajectory_futures)        # starts when the trajectories exist
    group.score_rollouts(rollouts_in_flight)                 # the same, for each rollout call's groups
    results = group.result(pending)                          # list[RewardResult], one per group
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from omegaconf import DictConfig

from rewards.base import RewardError
from rewards.worker import RewardResult, RewardWorker

from .backend import ActorSpec, Backend
from .config import plain, reward_specs, role_device, section, world_kwargs
from .errors import RewardGroupError
from .waiting import Wait

if TYPE_CHECKING:
    from .rollout_group import PendingRollout


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
            "device": role_device(cfg.cluster.reward_gpus), "world": world_kwargs(cfg)}


def split_by_environment(rewards: Sequence[Mapping[str, Any]]) -> list[tuple[Optional[dict], list[dict]]]:
    """Reward specs grouped by their Ray `runtime_env` (the key is taken off each spec): one actor pool per
    environment, in the order each environment first appears; specs without one share the run's environment."""
    pools: list[tuple[Optional[dict], list[dict]]] = []
    for spec in rewards:
        spec = dict(spec)
        env = plain(spec.pop("runtime_env", None)) or None
        for known, members in pools:
            if known == env:
                members.append(spec)
                break
        else:
            pools.append((env, [spec]))
    return pools


@dataclass
class PendingScores:
    """One submitted scoring of a list of groups: a call per environment pool."""
    parts: list[PendingScore]

    @property
    def futures(self) -> list[Any]:
        return [p.future for p in self.parts]


class RewardGroup:
    """The reward role: one actor pool per reward environment (`runtime_env` in a reward spec; usually one pool).
    Every pool scores every group with its own rewards; a group's reward is the sum of the pools' weighted sums
    (the weighted sum over all rewards), its components and details the union of theirs."""

    def __init__(self, pools: Sequence["RewardPool"]):
        if not pools:
            raise ValueError("a RewardGroup needs at least one pool")
        self.pools = list(pools)

    @classmethod
    def create(cls, backend: Backend, rewards: Sequence[Mapping[str, Any]], num_actors: int = 1,
               **options: Any) -> "RewardGroup":
        """`num_actors` actors per environment pool (the options: `RewardPool.create`)."""
        return cls([RewardPool.create(backend, specs, num_actors, runtime_env=env, **options)
                    for env, specs in split_by_environment(rewards)])

    @classmethod
    def from_config(cls, backend: Backend, cfg: DictConfig, specs: Any = None) -> "RewardGroup":
        """The run's reward actors (`cfg.rewards`, or other `specs` such as the evaluation's)."""
        c = cfg.cluster
        return cls.create(backend, reward_specs(cfg, cfg.rewards if specs is None else specs),
                          num_actors=c.num_reward_actors, decoder=decoder_spec(cfg), num_gpus=c.reward_gpus,
                          num_cpus=c.cpus_per_actor, max_restarts=c.max_restarts, device=role_device(c.reward_gpus),
                          resources=plain(c.reward_resources), node_labels=plain(c.reward_labels),
                          restart_timeout_s=c.reward_restart_s)

    # every actor of every pool, numbered across pools (the driver's readiness checks and timeline lanes)
    @property
    def actors(self) -> list[Any]:
        return [a for p in self.pools for a in p.actors]

    def _locate(self, i: int) -> tuple["RewardPool", int]:
        for pool in self.pools:
            if i < len(pool.actors):
                return pool, i
            i -= len(pool.actors)
        raise IndexError(i)

    @property
    def retries(self) -> int:
        return sum(p.retries for p in self.pools)

    def ready(self) -> list[Any]:
        return [f for p in self.pools for f in p.ready()]

    def note_pid(self, i: int, pid: int) -> None:
        pool, j = self._locate(i)
        pool.note_pid(j, pid)

    @property
    def pids(self) -> dict[int, int]:
        """Actor index (across pools) -> process id last seen."""
        out, offset = {}, 0
        for pool in self.pools:
            out.update({offset + j: pid for j, pid in pool.pids.items()})
            offset += len(pool.actors)
        return out

    def lane(self, pid: Optional[int]) -> str:
        """The timeline lane of the reward actor whose process scored a group."""
        by_pid = {p: i for i, p in self.pids.items()}
        return f"actor {by_pid[pid]}" if pid in by_pid else f"actor pid {pid}"

    def submit(self, items: Sequence[Mapping[str, Any]], trajectories: Sequence[Any] = (),
               actor: Optional[int] = None) -> PendingScores:
        """Start scoring `items` on every pool (`RewardPool.submit`) without waiting."""
        return PendingScores([p.submit(items, trajectories, actor) for p in self.pools])

    def result(self, pending: PendingScores) -> list[RewardResult]:
        """Wait for every pool's part; one merged `RewardResult` per group."""
        parts = [pool.result(part) for pool, part in zip(self.pools, pending.parts)]
        if len(parts) == 1:
            return parts[0]
        return [merge_results(per_pool) for per_pool in zip(*parts)]

    def score_rollouts(self, pending: Sequence["PendingRollout"]) -> None:
        """Submit the scoring of each rollout call's groups (`pending[i].score`); a call starts the moment its
        trajectories exist, so groups are scored as their worker finishes, while the driver does other work."""
        for p in pending:
            items = [{"prompts": [r.prompt] * r.group_size, "metadata": [r.metadata] * r.group_size}
                     for r in p.requests]
            p.score = self.submit(items, p.trajectories)

    def score_groups(self, items: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        """Score groups (blocking, with one retry per pool)."""
        return self.result(self.submit(items))

    def map(self, batches: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[RewardResult]]:
        """Score several lists of groups concurrently, one call per list and pool."""
        pending = [self.submit(b) for b in batches]
        return [self.result(p) for p in pending]

    def stats(self) -> list[dict[str, Any]]:
        return [s for p in self.pools for s in p.stats()]

    def shutdown(self) -> None:
        for p in self.pools:
            p.shutdown()


def merge_results(parts: Sequence[RewardResult]) -> RewardResult:
    """One group's result from several pools' results: rewards summed, components and details joined."""
    return RewardResult(rewards=sum((p.rewards for p in parts[1:]), parts[0].rewards.clone()),
                        components={k: v for p in parts for k, v in p.components.items()},
                        details={k: v for p in parts for k, v in p.details.items()},
                        span=(min(p.span[0] for p in parts), max(p.span[1] for p in parts)), pid=parts[0].pid)


class RewardPool:
    """Actors with the same rewards in the same environment. Round-robins scoring calls over them; retries a
    failed call once on the next actor (the same one, once the backend has restarted it, when there is only one),
    then raises RewardGroupError naming the reward. `timeout_s` bounds each wait for a result (None: no limit)."""

    def __init__(self, backend: Backend, actors: Sequence[Any], labels: Optional[Sequence[str]] = None,
                 timeout_s: Optional[float] = None, restart_timeout_s: float = 120.0,
                 spec: Optional[ActorSpec] = None, poll_s: float = 0.5):
        if not actors:
            raise ValueError("a RewardPool needs at least one actor")
        self.backend = backend
        self.actors = list(actors)
        self.labels = list(labels) if labels is not None else None
        self.timeout_s = timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.poll_s = poll_s               # how often a wait for a restarting actor asks again
        self.spec = spec                   # how to start a replacement for an actor gone for good
        self._next = itertools.count()
        self.retries = 0
        self.pids: dict[int, int] = {}     # actor index -> process id last seen (a restart changes it)
        self.out: dict[int, Any] = {}      # actors out of service (died; restarting or replaced) -> their ping

    @classmethod
    def create(cls, backend: Backend, rewards: Sequence[Mapping[str, Any]], num_actors: int = 1,
               decoder: Mapping[str, Any] | str | None = None, batch_size: int = 32, num_gpus: float = 0,
               num_cpus: float = 1, max_restarts: int = 1, device: Optional[str] = None,
               timeout_s: Optional[float] = None, resources: Optional[Mapping[str, float]] = None,
               node_labels: Optional[Mapping[str, str]] = None, restart_timeout_s: float = 120.0,
               runtime_env: Optional[Mapping[str, Any]] = None) -> "RewardPool":
        """Start `num_actors` reward actors with the same rewards and decoder (on nodes with `resources` /
        `node_labels`, in `runtime_env`, if given). Calls run in the order their trajectories arrive, not the
        order they were submitted (out-of-order actors)."""
        spec = ActorSpec(RewardWorker, (list(rewards), decoder, batch_size, device), num_cpus=num_cpus,
                         num_gpus=num_gpus, max_restarts=max_restarts, out_of_order=True,
                         resources=dict(resources or {}), labels=dict(node_labels or {}),
                         runtime_env=dict(runtime_env) if runtime_env else None)
        labels = [r.get("label") or r["name"] for r in rewards]
        return cls(backend, [backend.start(spec) for _ in range(num_actors)], labels, timeout_s, restart_timeout_s,
                   spec)

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
        if actor is None:
            live = self.in_service()
            i = live[next(self._next) % len(live)]
        else:
            i = actor % len(self.actors)
        future = self.backend.call(self.actors[i], "score_groups", items, *trajectories)
        return PendingScore(future, i, items, tuple(trajectories))

    def result(self, pending: PendingScore) -> list[RewardResult]:
        """Wait for a submitted call; on failure retry it once on the next actor, then raise RewardGroupError."""
        try:
            return self.backend.get(pending.future, timeout=self.timeout_s)
        except Exception as first:  # an exception in a reward, a dead actor, a timeout
            self.retries += 1
            if isinstance(first, self.backend.actor_errors):       # its process or node is gone
                self._take_out(pending.actor, first)
            others = [i for i in self.in_service() if i != pending.actor and i not in self.out]
            target = others[0] if others else (pending.actor + 1) % len(self.actors)
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
        """Wait (up to ``restart_timeout_s``) while actor `i` is restarting after its process died; one dead for
        good is replaced once. At the limit the wait ends quietly: the retry on it reports the failure."""
        ping, replaced = self.out.get(i) or self.backend.call(self.actors[i], "ping"), False
        for timeout in Wait(f"reward actor {i} to restart", self.poll_s, self.restart_timeout_s).polls():
            if not self.backend.wait([ping], timeout=timeout)[0]:
                continue
            try:
                self.note_pid(i, self.backend.get(ping))
                self.out.pop(i, None)
                return
            except self.backend.dead_errors:    # dead for good (restarts used up)
                if self.spec is None or replaced:
                    return                      # nothing (more) to start in its place: let the retry report it
                self._replace(i)
                replaced, ping = True, self.out[i]
            except Exception:                   # still restarting: ask again, after a breath
                time.sleep(min(self.poll_s, 0.2))
                ping = self.backend.call(self.actors[i], "ping")
                if i in self.out:
                    self.out[i] = ping

    # ----- elasticity: an actor whose process or node is gone leaves the rotation at once; it comes back when
    # Ray has restarted it (on any node with room, e.g. one that joined), or a new actor replaces one whose
    # restarts are used up. No call waits for that while another actor is in service.
    def in_service(self) -> list[int]:
        """Actor indices in the rotation (all of them while none is: calls then wait for a restart)."""
        self._probe()
        live = [i for i in range(len(self.actors)) if i not in self.out]
        return live or list(range(len(self.actors)))

    def _take_out(self, i: int, err: BaseException) -> None:
        if i in self.out:
            return
        print(f"[maskgrpo] reward actor {i} is out of service ({type(err).__name__}); its calls go to the "
              f"others until it is back", flush=True)
        if isinstance(err, self.backend.dead_errors) and self.spec is not None:
            self._replace(i)
        else:
            self.out[i] = self.backend.call(self.actors[i], "ping")

    def _replace(self, i: int) -> None:
        print(f"[maskgrpo] starting a new reward actor {i} in place of one gone for good (it starts when the "
              f"cluster has room for it)", flush=True)
        self.actors[i] = self.backend.start(self.spec)
        self.out[i] = self.backend.call(self.actors[i], "ping")

    def _probe(self) -> None:
        """Bring back the actors whose ping has answered."""
        if not self.out:
            return
        done, _ = self.backend.wait(list(self.out.values()), timeout=0)
        answered = {id(f) for f in done}
        for i, ping in list(self.out.items()):
            if id(ping) not in answered:
                continue
            try:
                self.note_pid(i, self.backend.get(ping))
            except self.backend.dead_errors:
                if self.spec is not None:
                    self._replace(i)
                continue
            except Exception:                   # still coming back: ask again
                self.out[i] = self.backend.call(self.actors[i], "ping")
                continue
            del self.out[i]
            print(f"[maskgrpo] reward actor {i} is back in service", flush=True)

    def note_pid(self, i: int, pid: int) -> None:
        """Record actor `i`'s process id (from `ping`); a new one means it was restarted: say so."""
        old = self.pids.get(i)
        if old is not None and old != pid:
            print(f"[maskgrpo] reward actor {i} was restarted (pid {old} -> {pid})", flush=True)
        self.pids[i] = pid

    def stats(self) -> list[dict[str, Any]]:
        return self.backend.get([self.backend.call(a, "stats") for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            self.backend.kill(a)
        self.actors = []
