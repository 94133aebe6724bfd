"""Rollout-fleet membership: which rollout workers are in service, who joins, who is lost, who replaces them.

The fleet (`cluster.min_rollout_workers` .. `max_rollout_workers`, both `num_rollout_workers` unless set) keeps
`max` workers started: those whose resources are not free yet wait in Ray's queue (where an autoscaler sees them)
and join between steps once they have built their model, with the current weights loaded before they sample. A
worker whose process or node is gone is dropped at once (Ray does not restart rollout workers) and a replacement
is queued. Sampling on the fleet is `cluster.rollout_group`'s job; this module only decides who is in it.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Protocol

from omegaconf import DictConfig

from actors.rollout import RolloutWorker

from .backend import ActorSpec, Backend
from .config import plain, role_device, rollout_range, section
from .errors import FleetError
from .preflight import StartupError, root_cause
from .waiting import Wait, wait_all


class WeightSource(Protocol):
    """Where a joining worker gets the current weights (the learner's hand-over)."""

    @property
    def version(self) -> int: ...

    def export(self) -> Any: ...      # a future of the weight buckets in host memory


def rollout_spec(cfg: DictConfig, worker_id: int) -> ActorSpec:
    """No Ray restarts: the fleet drops a dead worker and queues a fresh one (a restart waited for would stall the
    step, and one on a lost node may never come)."""
    c = cfg.cluster
    threads = max(1, int(c.cpus_per_actor)) if c.rollout_gpus == 0 else None
    return ActorSpec(RolloutWorker, (worker_id, section(cfg, "policy"), section(cfg, "sampler"),
                                     role_device(c.rollout_gpus), threads, section(cfg, "learner").lora),
                     num_cpus=c.cpus_per_actor, num_gpus=c.rollout_gpus, max_restarts=0,
                     resources=plain(c.rollout_resources) or {}, labels=plain(c.rollout_labels) or {})


def wants(cfg: DictConfig) -> str:
    """What one rollout worker asks of a node (for messages)."""
    c = cfg.cluster
    parts = [f"{c.cpus_per_actor:g} CPU"] + ([f"{c.rollout_gpus:g} GPU"] if c.rollout_gpus else []) + \
        [f"{v:g} {k}" for k, v in (plain(c.rollout_resources) or {}).items()]
    labels = plain(c.rollout_labels) or {}
    return ", ".join(parts) + (f" on a node labelled {labels}" if labels else "")


class RolloutFleet:
    """`weights`: the current weights for workers that join after the start; without it a joining worker keeps the
    weights it loads itself from `policy.init` (evaluation of a fixed checkpoint). `watch()` is called while the
    fleet waits (the driver checks that the learner is alive)."""

    def __init__(self, backend: Backend, cfg: DictConfig, weights: Optional[WeightSource] = None,
                 watch: Optional[Callable[[], None]] = None):
        self.backend = backend
        self.cfg = cfg
        self.min_workers, self.start_workers, self.max_workers = rollout_range(cfg.cluster)
        self.weights = weights
        self.watch = watch
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

    @property
    def version(self) -> int:
        """The weight version workers in service hold: the learner's (read, never kept here)."""
        return self.weights.version if self.weights is not None else 0

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
            loaded = self.backend.call(actor, "load_weights", self.weights.export())
            wait_all(self.backend, [loaded], Wait(
                f"rollout worker {i} to load the weights", self.cfg.cluster.poll_s, self.cfg.cluster.sync_timeout_s,
                self.watch, lambda s: FleetError(f"rollout worker {i} did not load the weights within "
                                                 f"cluster.sync_timeout_s={s:.0f} s: raise it for a slow network")))
            self.backend.get(loaded)
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

    def admit_joined(self, wait_s: float = 0.0) -> list[int]:
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
              f"new worker starts when a node has room for one ({wants(self.cfg)})", flush=True)
        self.replenish()

    def in_service(self) -> list[int]:
        """The ids of the workers in service, after admitting ready joiners; with fewer than the minimum, first
        waits for more (cluster.rollout_wait_s), then stops with FleetError naming what is missing."""
        self.admit_joined()
        if len(self.workers) < self.min_workers:
            c = self.cfg.cluster
            print(f"[maskgrpo] {len(self.workers)} rollout workers in service, cluster.min_rollout_workers="
                  f"{self.min_workers}: waiting up to cluster.rollout_wait_s={c.rollout_wait_s:g} s for a node with "
                  f"{wants(self.cfg)}", flush=True)
            for timeout in Wait("rollout workers to join", c.poll_s, c.rollout_wait_s, self.watch,
                                self._too_few).polls():
                self.replenish()
                self.admit_joined(wait_s=timeout)
                if len(self.workers) >= self.min_workers:
                    break
        return sorted(self.workers)

    def _too_few(self, elapsed: float) -> FleetError:
        c = self.cfg.cluster
        return FleetError(f"only {len(self.workers)} of cluster.min_rollout_workers={self.min_workers} rollout "
                          f"workers alive and no node with {wants(self.cfg)} free for cluster.rollout_wait_s="
                          f"{c.rollout_wait_s:g} s (`ray status` shows what is free): add such a node, or lower "
                          f"cluster.min_rollout_workers")

    def call(self, method: str, *args: Any) -> dict[int, Any]:
        """Call `method` on every worker in service; returns {worker id: future}."""
        return {i: self.backend.call(w, method, *args) for i, w in self.workers.items()}

    def statuses(self) -> dict[int, dict[str, Any]]:
        """Statuses of the workers in service; one that is gone is dropped (never waited for), and with fewer
        than the minimum left the fleet waits for new ones (`in_service`)."""
        while True:
            self.in_service()
            futures = self.call("ready")
            wait_all(self.backend, futures.values(), Wait("the rollout workers", self.cfg.cluster.poll_s,
                                                          watch=self.watch))
            status = {}
            for i, future in futures.items():
                try:
                    status[i] = self.backend.get(future)
                except self.backend.actor_errors as e:
                    self.drop(i, f"{type(e).__name__}: {root_cause(e)}")
            if len(status) == len(futures):
                return status

    def shutdown(self) -> None:
        for a in list(self.workers.values()) + [a for a, _ in self.joining.values()]:
            self.backend.kill(a)
        self.workers, self.joining = {}, {}
