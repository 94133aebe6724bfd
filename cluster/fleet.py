"""The rollout fleet: the rollout workers, and sampling groups on them with exactly-once re-issue on failure."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import ray
from omegaconf import DictConfig
from ray.exceptions import ActorDiedError, RayActorError

from actors.types import GroupMeta, GroupRequest

from .launch import start_rollout_worker

ACTOR_ERRORS = (RayActorError,)


@dataclass
class PendingRollout:
    worker: int
    requests: list[GroupRequest]
    meta_ref: Any
    traj_refs: list[Any]


@dataclass
class GroupResult:
    meta: GroupMeta
    traj_ref: Any


@dataclass
class RolloutStats:
    reissued: int = 0
    stale_dropped: int = 0
    staleness: list[int] = field(default_factory=list)


class RolloutFleet:
    """`weights()` returns the current (version, weight-bucket refs) for workers that Ray restarted; without it a
    restarted worker keeps the weights it loads itself from `policy.init` (evaluation of a fixed checkpoint)."""

    def __init__(self, cfg: DictConfig, weights: Optional[Callable[[], tuple[int, list[Any]]]] = None):
        self.cfg = cfg
        self.workers = {i: start_rollout_worker(cfg, i) for i in range(cfg.cluster.num_rollout_workers)}
        self.weights = weights
        self.version = 0

    def dispatch(self, requests: list[GroupRequest], overrides: Optional[dict[str, Any]] = None,
                 exclude: tuple[int, ...] = ()) -> list[PendingRollout]:
        """Spread groups over the workers, one batched `rollout` call per worker."""
        ids = [i for i in sorted(self.workers) if i not in exclude] or sorted(self.workers)
        pending = []
        for k, wid in enumerate(ids):
            chunk = requests[k::len(ids)]
            if chunk:
                refs = self.workers[wid].rollout.options(num_returns=len(chunk) + 1).remote(chunk, overrides)
                pending.append(PendingRollout(wid, chunk, refs[0], list(refs[1:])))
        return pending

    def gather(self, pending: list[PendingRollout], stats: RolloutStats, overrides: Optional[dict[str, Any]] = None,
               max_staleness: Optional[int] = None) -> list[GroupResult]:
        """Wait for rollouts. Groups of a failed worker, and groups staler than `max_staleness` versions, are
        re-issued once on the live workers; a second failure of the same groups stops the run."""
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
            for meta, ref in zip(metas, p.traj_refs):
                if max_staleness is not None and self.version - meta.policy_version > max_staleness:
                    stats.stale_dropped += 1
                    retry.append(next(r for r in p.requests if r.group_id == meta.group_id))
                    continue
                results.append(GroupResult(meta, ref))
        if retry:
            stats.reissued += len(retry)
            self.resync_restarted()
            for p in self.dispatch(retry, overrides, exclude=tuple(failed)):
                metas = ray.get(p.meta_ref)
                results.extend(GroupResult(m, r) for m, r in zip(metas, p.traj_refs))
        results.sort(key=lambda r: r.meta.group_id)
        return results

    def wait_ready(self, timeout_s: float = 300.0) -> dict[int, dict[str, Any]]:
        """Statuses of all workers, waiting while Ray restarts a dead one. A worker dead for good (its restarts
        used up) leaves the fleet, as long as another one remains."""
        deadline = time.monotonic() + timeout_s
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
