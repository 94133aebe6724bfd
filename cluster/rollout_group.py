"""The rollout role: sampling groups on the fleet's workers (`cluster.fleet`), and gathering them with their
rewards, exactly once each.

    pending = rollouts.dispatch(requests)          # one batched `rollout` call per worker in service
    rewards.score_rollouts(pending)                # each call's groups scored the moment they exist (streaming)
    groups = rollouts.gather(pending, rewards)     # as each worker finishes; lost or stale groups sampled again

Each group's samples depend only on its per-sample seeds, so the same seed gives the same samples whatever the
number of workers. A worker whose process or node is gone is dropped from the fleet and its groups are re-issued
on the live workers in the same step (no restart is waited for); a group more than `max_staleness` versions older
than the learner is sampled again once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from actors.types import GroupMeta, GroupRequest
from rewards.worker import RewardResult

from .backend import Backend
from .errors import FleetError, RewardGroupError
from .fleet import RolloutFleet
from .preflight import root_cause
from .reward_group import PendingScores, RewardGroup
from .waiting import Wait, wait_all, wait_any


@dataclass
class PendingRollout:
    """One worker's rollout call, and the reward call that scores its groups when they exist (if any)."""
    worker: int
    requests: list[GroupRequest]
    meta: Any                       # future: list[GroupMeta]
    trajectories: list[Any]         # futures: one Trajectory per group
    overrides: Optional[dict[str, Any]] = None
    score: Optional[PendingScores] = None


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


class WorkerLost(Exception):
    """A rollout call's worker is gone (its process or node): its groups are to be sampled again."""

    def __init__(self, requests: list[GroupRequest]):
        super().__init__(f"{len(requests)} groups lost")
        self.requests = requests


class Reissues:
    """How often each group was sampled again; a group that fails on three workers in a row stops the run."""

    def __init__(self) -> None:
        self.tries: dict[int, int] = {}

    def tried(self, group_id: int) -> bool:
        return bool(self.tries.get(group_id))

    def count(self, requests: list[GroupRequest]) -> None:
        for r in requests:
            self.tries[r.group_id] = self.tries.get(r.group_id, 0) + 1
            if self.tries[r.group_id] > 2:
                raise FleetError(f"group {r.group_id} (step {r.step}) failed on three rollout workers in a row: "
                                 f"the workers keep dying (see the lines above)")


class RolloutGroup:
    def __init__(self, backend: Backend, cfg: DictConfig, fleet: RolloutFleet):
        self.backend = backend
        self.cfg = cfg
        self.fleet = fleet

    def _wait(self, what: str) -> Wait:
        return Wait(what, self.cfg.cluster.poll_s, watch=self.fleet.watch)

    def dispatch(self, requests: list[GroupRequest], overrides: Optional[dict[str, Any]] = None,
                 exclude: tuple[int, ...] = ()) -> list[PendingRollout]:
        """Spread groups over the workers in service, one batched `rollout` call per worker."""
        ids = [i for i in self.fleet.in_service() if i not in exclude] or self.fleet.in_service()
        pending = []
        for k, wid in enumerate(ids):
            chunk = requests[k::len(ids)]
            if chunk:
                futures = self.backend.call(self.fleet.workers[wid], "rollout", chunk, overrides,
                                            num_returns=len(chunk) + 1)
                pending.append(PendingRollout(wid, chunk, futures[0], list(futures[1:]), overrides))
        return pending

    def collect(self, p: PendingRollout, rewards: Optional[RewardGroup]) -> list[GroupResult]:
        """A finished rollout call's groups with their scores (waited for). Raises WorkerLost when its worker is
        gone (the rollout failed, or the trajectories the reward needed lived on a lost node)."""
        try:
            metas = self.backend.get(p.meta)
        except self.backend.actor_errors + self.backend.lost_errors as e:
            raise self._lost(p, e) from None
        if rewards is None:
            return [GroupResult(m, t) for m, t in zip(metas, p.trajectories)]
        if p.score is None:                                # dispatched unscored: score now
            rewards.score_rollouts([p])
        wait_all(self.backend, p.score.futures, self._wait(f"the rewards of rollout worker {p.worker}"))
        try:
            scores = rewards.result(p.score)
        except RewardGroupError as e:
            if p.worker in self.fleet.workers and self.backend.alive(self.fleet.workers[p.worker]):
                raise
            raise self._lost(p, e) from None
        return [GroupResult(m, t, s) for m, t, s in zip(metas, p.trajectories, scores)]

    def _lost(self, p: PendingRollout, e: BaseException) -> WorkerLost:
        self.fleet.drop(p.worker, f"{type(e).__name__}: {root_cause(e)}")
        return WorkerLost(list(p.requests))

    def gather(self, pending: list[PendingRollout], rewards: Optional[RewardGroup], stats: RolloutStats,
               version: int = 0, max_staleness: Optional[int] = None) -> list[GroupResult]:
        """Wait for rollouts and their rewards, as each worker finishes. Groups of a worker that is gone, and
        groups more than `max_staleness` versions older than `version` (once), are dispatched and scored again
        at once. Results are in group-id order, each group once."""
        results: list[GroupResult] = []
        reissues = Reissues()
        pending = list(pending)
        overrides = pending[0].overrides if pending else None
        while pending:
            finished = {id(f) for f in wait_any(self.backend, [p.meta for p in pending], self._wait("rollouts"))}
            again: list[GroupRequest] = []
            for p in [p for p in pending if id(p.meta) in finished]:
                pending.remove(p)
                try:
                    groups = self.collect(p, rewards)
                except WorkerLost as lost:
                    again += lost.requests
                    continue
                stats.rollout_tokens += sum(g.meta.rollout_tokens for g in groups)
                requests = {r.group_id: r for r in p.requests}
                for g in groups:
                    stale = max_staleness is not None and version - g.meta.policy_version > max_staleness
                    if stale and not reissues.tried(g.meta.group_id):
                        stats.stale_dropped += 1
                        again.append(requests[g.meta.group_id])
                    else:
                        results.append(g)
            if again:
                reissues.count(again)
                stats.reissued += len(again)
                print(f"[maskgrpo] re-issuing {len(again)} groups on {len(self.fleet.workers)} rollout workers",
                      flush=True)
                redo = self.dispatch(again, overrides)
                if rewards is not None:
                    rewards.score_rollouts(redo)
                pending += redo
        results.sort(key=lambda r: r.meta.group_id)
        return results
