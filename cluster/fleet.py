"""The rollout fleet: the rollout workers, and sampling groups on them with exactly-once re-issue on failure.

Rewards stream: `dispatch` with a reward pool submits each worker's scoring call together with its rollout,
passing the rollout's trajectory references, so a reward actor scores a worker's groups the moment that worker
finishes (not after the slowest worker), while the driver may be busy elsewhere (e.g. waiting for the learner).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import ray
from omegaconf import DictConfig
from ray.exceptions import ActorDiedError, RayActorError

from actors.types import GroupMeta, GroupRequest
from rewards.pool import PendingScore, RewardPool

from .launch import start_rollout_worker

ACTOR_ERRORS = (RayActorError,)


@dataclass
class PendingRollout:
    """One worker's rollout call, and the reward call that scores its groups when they exist (if any)."""
    worker: int
    requests: list[GroupRequest]
    meta_ref: Any
    traj_refs: list[Any]
    score: Optional[PendingScore] = None


@dataclass
class GroupResult:
    meta: GroupMeta
    traj_ref: Any
    scores: Optional[dict[str, Any]] = None   # the reward actor's result for the group (see RewardWorker)


@dataclass
class RolloutStats:
    reissued: int = 0
    stale_dropped: int = 0
    staleness: list[int] = field(default_factory=list)


def _submit_score(rewards: RewardPool, p: PendingRollout) -> PendingScore:
    """The reward call for a worker's groups; it starts when their trajectories exist."""
    items = [{"prompts": [r.prompt] * len(r.seeds), "metadata": [r.metadata] * len(r.seeds)} for r in p.requests]
    return rewards.submit(items, p.traj_refs)


class RolloutFleet:
    """`weights()` returns the current (version, weight-bucket refs) for workers that Ray restarted; without it a
    restarted worker keeps the weights it loads itself from `policy.init` (evaluation of a fixed checkpoint)."""

    def __init__(self, cfg: DictConfig, weights: Optional[Callable[[], tuple[int, list[Any]]]] = None):
        self.cfg = cfg
        self.workers = {i: start_rollout_worker(cfg, i) for i in range(cfg.cluster.num_rollout_workers)}
        self.weights = weights
        self.version = 0
        self.pids: dict[int, int] = {}     # each worker's process, to notice (and log) a restart

    def dispatch(self, requests: list[GroupRequest], overrides: Optional[dict[str, Any]] = None,
                 exclude: tuple[int, ...] = (), rewards: Optional[RewardPool] = None) -> list[PendingRollout]:
        """Spread groups over the workers, one batched `rollout` call per worker; with `rewards`, also submit the
        call that scores each worker's groups as soon as they exist."""
        ids = [i for i in sorted(self.workers) if i not in exclude] or sorted(self.workers)
        pending = []
        for k, wid in enumerate(ids):
            chunk = requests[k::len(ids)]
            if chunk:
                refs = self.workers[wid].rollout.options(num_returns=len(chunk) + 1).remote(chunk, overrides)
                p = PendingRollout(wid, chunk, refs[0], list(refs[1:]))
                if rewards is not None:
                    p.score = _submit_score(rewards, p)
                pending.append(p)
        return pending

    def gather(self, pending: list[PendingRollout], stats: RolloutStats, overrides: Optional[dict[str, Any]] = None,
               max_staleness: Optional[int] = None, rewards: Optional[RewardPool] = None) -> list[GroupResult]:
        """Wait for rollouts (and their rewards, when they were dispatched with a pool). Groups of a failed
        worker, and groups staler than `max_staleness` versions, are re-issued once on the live workers; a second
        failure of the same groups stops the run. Results are in group-id order, each group once."""
        results: list[GroupResult] = []
        retry: list[GroupRequest] = []
        failed: set[int] = set()
        for p in pending:
            try:
                metas = ray.get(p.meta_ref)
            except ACTOR_ERRORS as e:
                failed.add(p.worker)
                print(f"[maskgrpo] rollout worker {p.worker} failed ({type(e).__name__}); re-issuing "
                      f"{len(p.requests)} groups", flush=True)
                retry.extend(p.requests)
                continue
            if rewards is not None and p.score is None:        # dispatched without a pool: score now
                p.score = _submit_score(rewards, p)
            scores = rewards.result(p.score) if p.score is not None else [None] * len(metas)
            for meta, ref, score in zip(metas, p.traj_refs, scores):
                if max_staleness is not None and self.version - meta.policy_version > max_staleness:
                    stats.stale_dropped += 1
                    retry.append(next(r for r in p.requests if r.group_id == meta.group_id))
                    continue
                results.append(GroupResult(meta, ref, score))
        if retry:
            stats.reissued += len(retry)
            self.resync_restarted()
            for p in self.dispatch(retry, overrides, exclude=tuple(failed), rewards=rewards):
                metas = ray.get(p.meta_ref)
                scores = rewards.result(p.score) if p.score is not None else [None] * len(metas)
                results.extend(GroupResult(m, r, sc) for m, r, sc in zip(metas, p.traj_refs, scores))
        results.sort(key=lambda r: r.meta.group_id)
        return results

    def wait_ready(self, timeout_s: float = 300.0) -> dict[int, dict[str, Any]]:
        """Statuses of all workers, waiting while Ray restarts a dead one. A worker dead for good (its restarts
        used up) leaves the fleet, as long as another one remains."""
        deadline = time.monotonic() + timeout_s
        announced: set[int] = set()
        while True:
            ids = sorted(self.workers)
            refs = [self.workers[i].ready.remote() for i in ids]
            status, restarting = {}, []
            for i, ref in zip(ids, refs):
                try:
                    status[i] = ray.get(ref, timeout=600)
                except ActorDiedError:
                    if len(self.workers) == 1:
                        raise
                    print(f"[maskgrpo] rollout worker {i} is dead for good (restarts used up); continuing with "
                          f"{len(self.workers) - 1} workers", flush=True)
                    del self.workers[i]
                except ACTOR_ERRORS:
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
            version, refs = self.weights()
            ray.get([self.workers[i].load_weights.remote(refs) for i in stale])
        return stale

    def shutdown(self) -> None:
        for a in self.workers.values():
            try:
                ray.kill(a)
            except Exception:
                pass
