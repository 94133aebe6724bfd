"""The rollout role: an elastic fleet of rollout workers (`actors.rollout.RolloutWorker`), and sampling groups
on them with exactly-once re-issue on failure.

The fleet (`cluster.min_rollout_workers` .. `max_rollout_workers`, both `num_rollout_workers` unless set) keeps
`max` workers started: those whose resources are not free yet wait in Ray's queue (where an autoscaler sees them)
and join between steps once they have built their model, with the current weights loaded before they sample. A
worker whose process or node is gone is dropped at once (Ray does not restart rollout workers): its groups are
re-issued on the live workers in the same step, and a replacement is queued. Each group's samples depend only on
its per-sample seeds, so the same seed gives the same samples whatever the number of workers.

Rewards stream: `dispatch` with a reward group submits each worker's scoring call together with its rollout,
passing the rollout's trajectory futures, so a reward actor scores a worker's groups the moment that worker
finishes (not after the slowest worker), while the driver may be busy elsewhere (e.g. waiting for the learner).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from actors.rollout import RolloutWorker
from actors.types import GroupMeta, GroupRequest
from rewards.worker import RewardResult

from .backend import ActorSpec, Backend
from .config import plain, role_device, rollout_range, section
from .errors import FleetError, RewardGroupError
from .preflight import StartupError, root_cause
from .reward_group import PendingScore, RewardGroup


@dataclass
class PendingRollout:
    """One worker's rollout call, and the reward call that scores its groups when they exist (if any)."""
    worker: int
    requests: list[GroupRequest]
    meta: Any                       # future: list[GroupMeta]
    trajectories: list[Any]         # futures: one Trajectory per group
    score: Optional[PendingScore] = None


@dataclass
class GroupResult:
    meta: GroupMeta
    trajectory: Any                 # a future of the group's Trajectory (the driver never reads it)
    scores: Optional[RewardResult] = None


@dataclass
class RolloutStats:
    reissued: int = 0
    stale_dropped: int = 0
    rollout_tokens: float = 0.0        # image-token positions the rollout model evaluated (dropped groups too)


def _submit_score(rewards: RewardGroup, p: PendingRollout) -> PendingScore:
    """The reward call for a worker's groups; it starts when their trajectories exist."""
    items = [{"prompts": [r.prompt] * r.group_size, "metadata": [r.metadata] * r.group_size} for r in p.requests]
    return rewards.submit(items, p.trajectories)


def rollout_spec(cfg: DictConfig, worker_id: int) -> ActorSpec:
    """No Ray restarts: the fleet drops a dead worker and queues a fresh one (a restart waited for would stall the
    step, and one on a lost node may never come)."""
    c = cfg.cluster
    threads = max(1, int(c.cpus_per_actor)) if c.rollout_gpus == 0 else None
    return ActorSpec(RolloutWorker, (worker_id, section(cfg, "policy"), section(cfg, "sampler"),
                                     role_device(c.rollout_gpus), threads, section(cfg, "learner").lora),
                     num_cpus=c.cpus_per_actor, num_gpus=c.rollout_gpus, max_restarts=0,
                     resources=plain(c.rollout_resources) or {}, labels=plain(c.rollout_labels) or {})


def _wants(cfg: DictConfig) -> str:
    """What one rollout worker asks of a node (for messages)."""
    c = cfg.cluster
    parts = [f"{c.cpus_per_actor:g} CPU"] + ([f"{c.rollout_gpus:g} GPU"] if c.rollout_gpus else []) + \
        [f"{v:g} {k}" for k, v in (plain(c.rollout_resources) or {}).items()]
    labels = plain(c.rollout_labels) or {}
    return ", ".join(parts) + (f" on a node labelled {labels}" if labels else "")


class RolloutGroup:
    """`weights()` returns the current (version, future of the weight buckets) for workers that join without
    them; without it a joining worker keeps the weights it loads itself from `policy.init` (evaluation of a fixed
    checkpoint). `watch()` is called while the group waits (the driver checks that the learner is alive)."""

    def __init__(self, backend: Backend, cfg: DictConfig,
                 weights: Optional[Callable[[], tuple[int, Any]]] = None,
                 watch: Optional[Callable[[], None]] = None):
        self.backend = backend
        self.cfg = cfg
        self.min_workers, self.start_workers, self.max_workers = rollout_range(cfg.cluster)
        self.weights = weights
        self.watch = watch or (lambda: None)
        self.version = 0                   # the weight version every worker holds (after a sync)
        self.workers: dict[int, Any] = {}  # in service, with the current weights
        self.joining: dict[int, tuple[Any, Any]] = {}   # started, not yet in service: (actor, ready future)
        self.pids: dict[int, int] = {}
        self.nodes: dict[int, Optional[str]] = {}
        self.lost = 0                      # workers dropped (process or node gone)
        self.joined = 0                    # workers that joined after the start
        self.failed_starts = 0
        self._ids = itertools.count()
        self._started = False
        self.replenish()

    # ----- membership -------------------------------------------------------------------------------------------
    def _start_one(self) -> None:
        i = next(self._ids)
        actor = self.backend.start(rollout_spec(self.cfg, i))
        self.joining[i] = (actor, self.backend.call(actor, "ready"))

    def replenish(self) -> None:
        """Queue workers up to the maximum; a worker that cannot start (its process died while loading) is replaced
        up to cluster.max_restarts times per slot."""
        budget = self.cfg.cluster.max_restarts * self.max_workers
        while len(self.workers) + len(self.joining) < self.max_workers and self.failed_starts <= budget:
            self._start_one()

    def ready(self) -> dict[int, Any]:
        """{worker id: future of its status} of the workers not yet in service (the driver's start-up waits for
        them; `admit` takes the status)."""
        return {i: f for i, (_, f) in self.joining.items()}

    def admit(self, i: int, status: dict[str, Any]) -> None:
        """Put joining worker `i` in service; after the start it first gets the current weights."""
        actor, _ = self.joining.pop(i)
        if self.weights is not None and self._started and status["version"] != self.version:
            _, buckets = self.weights()
            self.backend.get(self.backend.call(actor, "load_weights", buckets),
                             timeout=self.cfg.cluster.sync_timeout_s)
        self.workers[i], self.pids[i] = actor, status["pid"]
        self.nodes[i] = self.backend.node(actor)
        if self._started:
            self.joined += 1
            where = f" on node {self.nodes[i][:12]}" if self.nodes[i] else ""
            print(f"[maskgrpo] rollout worker {i} joined{where} with weight version {self.version} "
                  f"({len(self.workers)} in service)", flush=True)

    def started(self) -> None:
        """The run's start-up is over: from now on a joining worker gets the current weights first."""
        self._started = True

    def poll_joins(self, wait_s: float = 0.0) -> list[int]:
        """Admit the joining workers that are ready (waiting up to `wait_s` for them); returns their ids."""
        if not self.joining:
            return []
        by_future = {id(f): i for i, (_, f) in self.joining.items()}
        done, _ = self.backend.wait([f for _, f in self.joining.values()], timeout=wait_s)
        admitted = []
        for f in done:
            i = by_future[id(f)]
            try:
                status = self.backend.get(f)
            except Exception as e:
                actor, _ = self.joining.pop(i)
                self.backend.kill(actor)
                if getattr(e, "actor_init_failed", False) or not isinstance(e, self.backend.actor_errors):
                    raise StartupError(f"rollout worker {i} could not start: {root_cause(e)}") from None
                self.failed_starts += 1
                print(f"[maskgrpo] rollout worker {i} died while starting ({root_cause(e)}); queueing another",
                      flush=True)
                self.replenish()
                continue
            self.admit(i, status)
            admitted.append(i)
        return admitted

    def drop(self, i: int, why: str) -> None:
        """Take worker `i` out of service for good (its process or node is gone) and queue a replacement."""
        actor = self.workers.pop(i, None)
        if actor is None:
            return
        self.backend.kill(actor)
        self.pids.pop(i, None)
        self.lost += 1
        print(f"[maskgrpo] rollout worker {i} is gone ({why}); {len(self.workers)} in service take its groups; a "
              f"new worker starts when a node has room for one ({_wants(self.cfg)})", flush=True)
        self.replenish()

    def ensure_min(self) -> None:
        """Admit ready joiners; with fewer than the minimum in service, wait for more (cluster.rollout_wait_s),
        then stop with FleetError naming what is missing."""
        self.poll_joins()
        if len(self.workers) >= self.min_workers:
            return
        c = self.cfg.cluster
        t0 = time.monotonic()
        print(f"[maskgrpo] {len(self.workers)} rollout workers in service, cluster.min_rollout_workers="
              f"{self.min_workers}: waiting up to cluster.rollout_wait_s={c.rollout_wait_s:g} s for a node with "
              f"{_wants(self.cfg)}", flush=True)
        while len(self.workers) < self.min_workers:
            if time.monotonic() - t0 > c.rollout_wait_s:
                raise FleetError(f"only {len(self.workers)} of cluster.min_rollout_workers={self.min_workers} "
                                 f"rollout workers alive and no node with {_wants(self.cfg)} free for "
                                 f"cluster.rollout_wait_s={c.rollout_wait_s:g} s (`ray status` shows what is "
                                 f"free): add such a node, or lower cluster.min_rollout_workers")
            self.replenish()
            self.watch()
            self.poll_joins(wait_s=c.poll_s)

    def call(self, method: str, *args: Any) -> dict[int, Any]:
        """Call `method` on every worker in service; returns {worker id: future}."""
        return {i: self.backend.call(w, method, *args) for i, w in self.workers.items()}

    # ----- sampling -------------------------------------------------------------------------------------------------
    def dispatch(self, requests: list[GroupRequest], overrides: Optional[dict[str, Any]] = None,
                 exclude: tuple[int, ...] = (), rewards: Optional[RewardGroup] = None) -> list[PendingRollout]:
        """Spread groups over the workers in service, one batched `rollout` call per worker; with `rewards`, also
        submit the call that scores each worker's groups as soon as they exist."""
        self.ensure_min()
        ids = [i for i in sorted(self.workers) if i not in exclude] or sorted(self.workers)
        pending = []
        for k, wid in enumerate(ids):
            chunk = requests[k::len(ids)]
            if chunk:
                futures = self.backend.call(self.workers[wid], "rollout", chunk, overrides,
                                            num_returns=len(chunk) + 1)
                p = PendingRollout(wid, chunk, futures[0], list(futures[1:]))
                if rewards is not None:
                    p.score = _submit_score(rewards, p)
                pending.append(p)
        return pending

    def _wait(self, futures: list[Any]) -> list[Any]:
        """Those of `futures` that are done, waiting at most cluster.poll_s (then `watch()`) for all of them."""
        done, _ = self.backend.wait(futures, timeout=self.cfg.cluster.poll_s)
        if len(done) < len(futures):
            self.watch()
        return done

    def _lost(self, p: PendingRollout, e: BaseException) -> list[GroupRequest]:
        self.drop(p.worker, f"{type(e).__name__}: {root_cause(e)}")
        return list(p.requests)

    def gather(self, pending: list[PendingRollout], stats: RolloutStats, overrides: Optional[dict[str, Any]] = None,
               max_staleness: Optional[int] = None, rewards: Optional[RewardGroup] = None) -> list[GroupResult]:
        """Wait for rollouts (and their rewards, when they were dispatched with a reward group), as each worker
        finishes. Groups of a worker that is gone are re-issued at once on the workers in service (no restart is
        waited for), and groups staler than `max_staleness` versions once; a group that fails on three workers
        stops the run. Results are in group-id order, each group once."""
        results: list[GroupResult] = []
        tries: dict[int, int] = {}
        errors = self.backend.actor_errors + self.backend.lost_errors
        pending = list(pending)
        while pending:
            by_meta = {id(p.meta): p for p in pending}
            done = [by_meta[id(f)] for f in self._wait([p.meta for p in pending])]
            retry: list[GroupRequest] = []
            for p in done:
                pending.remove(p)
                try:
                    metas = self.backend.get(p.meta)
                except errors as e:
                    retry += self._lost(p, e)
                    continue
                stats.rollout_tokens += sum(m.rollout_tokens for m in metas)
                if rewards is not None and p.score is None:        # dispatched without rewards: score now
                    p.score = _submit_score(rewards, p)
                if p.score is not None:
                    while len(self._wait(p.score.futures)) < len(p.score.futures):
                        pass
                    try:
                        scores = rewards.result(p.score)
                    except RewardGroupError as e:    # the trajectories lived on a node that is gone
                        if p.worker in self.workers and self.backend.alive(self.workers[p.worker]):
                            raise
                        retry += self._lost(p, e)
                        continue
                else:
                    scores = [None] * len(metas)
                for meta, traj, score in zip(metas, p.trajectories, scores):
                    if max_staleness is not None and self.version - meta.policy_version > max_staleness and \
                            not tries.get(meta.group_id):
                        stats.stale_dropped += 1
                        retry.append(next(r for r in p.requests if r.group_id == meta.group_id))
                        continue
                    results.append(GroupResult(meta, traj, score))
            if retry:
                for r in retry:
                    tries[r.group_id] = tries.get(r.group_id, 0) + 1
                    if tries[r.group_id] > 2:
                        raise FleetError(f"group {r.group_id} (step {r.step}) failed on three rollout workers in a "
                                         f"row: the workers keep dying (see the lines above)")
                stats.reissued += len(retry)
                print(f"[maskgrpo] re-issuing {len(retry)} groups on {len(self.workers)} rollout workers",
                      flush=True)
                self.resync_restarted()
                pending += self.dispatch(retry, overrides, rewards=rewards)
        results.sort(key=lambda r: r.meta.group_id)
        return results

    def wait_ready(self) -> dict[int, dict[str, Any]]:
        """Statuses of the workers in service; one that is gone is dropped (never waited for), and with fewer
        than the minimum left the group waits for new ones (`ensure_min`)."""
        while True:
            self.ensure_min()
            futures = self.call("ready")
            status = {}
            pending = list(futures.values())
            while pending:
                done = {id(f) for f in self._wait(pending)}
                pending = [f for f in pending if id(f) not in done]
            for i, future in futures.items():
                try:
                    status[i] = self.backend.get(future)
                except self.backend.actor_errors as e:
                    self.drop(i, f"{type(e).__name__}: {root_cause(e)}")
            if len(status) == len(futures):
                return status

    def resync_restarted(self) -> list[int]:
        """Admit workers that are ready to join (each gets the current weights first); returns their ids."""
        return self.poll_joins()

    def shutdown(self) -> None:
        for a in list(self.workers.values()) + [a for a, _ in self.joining.values()]:
            self.backend.kill(a)
        self.workers, self.joining = {}, {}
