"""The rollout role: rollout workers (`actors.rollout.RolloutWorker`), and sampling groups on them with
exactly-once re-issue on failure.

Rewards stream: `dispatch` with a reward group submits each worker's scoring call together with its rollout,
passing the rollout's trajectory futures, so a reward actor scores a worker's groups the moment that worker
finishes (not after the slowest worker), while the driver may be busy elsewhere (e.g. waiting for the learner).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from actors.rollout import RolloutWorker
from actors.types import GroupMeta, GroupRequest
from rewards.worker import RewardResult

from .backend import ActorSpec, Backend
from .config import role_device, section
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
    staleness: list[int] = field(default_factory=list)


def _submit_score(rewards: RewardGroup, p: PendingRollout) -> PendingScore:
    """The reward call for a worker's groups; it starts when their trajectories exist."""
    items = [{"prompts": [r.prompt] * len(r.seeds), "metadata": [r.metadata] * len(r.seeds)} for r in p.requests]
    return rewards.submit(items, p.trajectories)


def rollout_spec(cfg: DictConfig, worker_id: int) -> ActorSpec:
    c = cfg.cluster
    threads = max(1, int(c.cpus_per_actor)) if c.rollout_gpus == 0 else None
    return ActorSpec(RolloutWorker, (worker_id, section(cfg, "policy"), section(cfg, "sampler"),
                                     role_device(c.rollout_gpus), threads, section(cfg, "learner").lora),
                     num_cpus=c.cpus_per_actor, num_gpus=c.rollout_gpus, max_restarts=c.max_restarts)


class RolloutGroup:
    """`weights()` returns the current (version, future of the weight buckets) for workers that came back
    without them; without it a restarted worker keeps the weights it loads itself from `policy.init`
    (evaluation of a fixed checkpoint)."""

    def __init__(self, backend: Backend, cfg: DictConfig,
                 weights: Optional[Callable[[], tuple[int, Any]]] = None):
        self.backend = backend
        self.cfg = cfg
        self.workers = {i: backend.start(rollout_spec(cfg, i)) for i in range(cfg.cluster.num_rollout_workers)}
        self.weights = weights
        self.version = 0                   # the weight version every worker holds (after a sync)
        self.pids: dict[int, int] = {}     # each worker's process, to notice (and log) a restart

    def call(self, method: str, *args: Any) -> dict[int, Any]:
        """Call `method` on every worker; returns {worker id: future}."""
        return {i: self.backend.call(w, method, *args) for i, w in self.workers.items()}

    def ready(self) -> dict[int, Any]:
        return self.call("ready")

    def dispatch(self, requests: list[GroupRequest], overrides: Optional[dict[str, Any]] = None,
                 exclude: tuple[int, ...] = (), rewards: Optional[RewardGroup] = None) -> list[PendingRollout]:
        """Spread groups over the workers, one batched `rollout` call per worker; with `rewards`, also submit the
        call that scores each worker's groups as soon as they exist."""
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

    def gather(self, pending: list[PendingRollout], stats: RolloutStats, overrides: Optional[dict[str, Any]] = None,
               max_staleness: Optional[int] = None, rewards: Optional[RewardGroup] = None) -> list[GroupResult]:
        """Wait for rollouts (and their rewards, when they were dispatched with a reward group). Groups of a
        failed worker, and groups staler than `max_staleness` versions, are re-issued once on the live workers; a
        second failure of the same groups stops the run. Results are in group-id order, each group once."""
        results: list[GroupResult] = []
        retry: list[GroupRequest] = []
        failed: set[int] = set()
        for p in pending:
            try:
                metas = self.backend.get(p.meta)
            except self.backend.actor_errors as e:
                failed.add(p.worker)
                print(f"[maskgrpo] rollout worker {p.worker} failed ({type(e).__name__}); re-issuing "
                      f"{len(p.requests)} groups", flush=True)
                retry.extend(p.requests)
                continue
            if rewards is not None and p.score is None:        # dispatched without rewards: score now
                p.score = _submit_score(rewards, p)
            scores = rewards.result(p.score) if p.score is not None else [None] * len(metas)
            for meta, traj, score in zip(metas, p.trajectories, scores):
                if max_staleness is not None and self.version - meta.policy_version > max_staleness:
                    stats.stale_dropped += 1
                    retry.append(next(r for r in p.requests if r.group_id == meta.group_id))
                    continue
                results.append(GroupResult(meta, traj, score))
        if retry:
            stats.reissued += len(retry)
            self.resync_restarted()
            for p in self.dispatch(retry, overrides, exclude=tuple(failed), rewards=rewards):
                metas = self.backend.get(p.meta)
                scores = rewards.result(p.score) if p.score is not None else [None] * len(metas)
                results.extend(GroupResult(m, t, sc) for m, t, sc in zip(metas, p.trajectories, scores))
        results.sort(key=lambda r: r.meta.group_id)
        return results

    def wait_ready(self, timeout_s: float = 300.0) -> dict[int, dict[str, Any]]:
        """Statuses of all workers, waiting while the backend restarts a dead one. A worker dead for good (its
        restarts used up) leaves the group, as long as another one remains."""
        deadline = time.monotonic() + timeout_s
        announced: set[int] = set()
        while True:
            futures = self.ready()
            status, restarting = {}, []
            for i, future in futures.items():
                try:
                    status[i] = self.backend.get(future, timeout=600)
                except self.backend.dead_errors:
                    if len(self.workers) == 1:
                        raise
                    print(f"[maskgrpo] rollout worker {i} is dead for good (restarts used up); continuing with "
                          f"{len(self.workers) - 1} workers", flush=True)
                    del self.workers[i]
                except self.backend.actor_errors:
                    restarting.append(i)
                    if i not in announced:
                        announced.add(i)
                        print(f"[maskgrpo] rollout worker {i} died; Ray is restarting it (cluster.max_restarts="
                              f"{self.cfg.cluster.max_restarts})", flush=True)
            for i, s in status.items():
                if self.pids.get(i) not in (None, s["pid"]):
                    print(f"[maskgrpo] rollout worker {i} was restarted (pid {self.pids[i]} -> {s['pid']}); it gets "
                          f"the current weights before it samples again", flush=True)
                self.pids[i] = s["pid"]
            if not restarting:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout workers {restarting} did not come back within {timeout_s:.0f} s")
            time.sleep(0.5)

    def resync_restarted(self) -> list[int]:
        """Give workers that came back without the current weights the learner's weights (object store)."""
        status = self.wait_ready()
        if self.weights is None:
            return []
        stale = [i for i, s in status.items() if s["version"] != self.version]
        if stale:
            _, buckets = self.weights()
            self.backend.get([self.backend.call(self.workers[i], "load_weights", buckets) for i in stale])
        return stale

    def shutdown(self) -> None:
        for a in self.workers.values():
            self.backend.kill(a)
