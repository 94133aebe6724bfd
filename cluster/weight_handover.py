"""The learner group's weight hand-over to the rollout group: which path, over which group, with which retries.

Paths (`actors.weight_sync.SyncPath`): `in_process` on the local backend (the learner's buckets applied straight
from its device); on Ray a broadcast group (NCCL when every worker has its own GPU, gloo when a member is on the
CPU), CUDA IPC handles when the workers share the learner's GPU, or the object store (a mixed placement,
`cluster.weight_sync=object_store`, or the fallback when a broadcast fails). The choice is made at the first
sync, again whenever the workers change, and logged when it changes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from actors.weight_sync import SyncPath, choose_sync_path

from .errors import FleetError, LearnerFailure
from .waiting import Wait, wait_all

if TYPE_CHECKING:
    from .learner_group import LearnerGroup
    from .fleet import RolloutFleet


@dataclass
class SyncStats:
    seconds: float
    bytes: float
    path: str

    def metrics(self) -> dict[str, Any]:
        return {"sync_seconds": self.seconds, "sync_bytes": self.bytes,
                "sync_collective": float(self.path == SyncPath.collective), "sync_path": self.path}


class WeightHandover:
    def __init__(self, learner: "LearnerGroup", cluster_cfg: Any):
        self.learner = learner
        self.backend = learner.backend
        self.cluster_cfg = cluster_cfg
        self.bucket_bytes = int(cluster_cfg.weight_bucket_mb) << 20
        self.weight_dtype: Optional[str] = None    # the workers' parameter dtype: weights travel in it
        self.path: Optional[SyncPath] = None       # chosen at the first sync and whenever the workers change
        self.collective_backend = ""
        self._configured: Optional[str] = None
        self._logged: tuple[Optional[str], str] = (None, "")
        self._worker_pids: dict[int, int] = {}
        self._group_epoch = 0
        self._group_ready = False

    @property
    def version(self) -> int:
        """The version of the weights handed over: the learner's (the one owner of the version)."""
        return self.learner.version

    def export(self) -> Any:
        """A future of the weight buckets in host memory, for workers that join without them."""
        return self.learner.export(self.bucket_bytes, self.weight_dtype)

    def sync(self, rollouts: "RolloutFleet") -> SyncStats:
        """Publish the learner's weights to every rollout worker. A failed collective broadcast (a member died or
        timed out) falls back to the object store for this sync; a worker that dies during the transfer is
        dropped from the fleet (`RolloutFleet.statuses`) and the transfer is tried again."""
        t0 = time.perf_counter()
        nbytes, fallback, mode = 0.0, False, SyncPath.object_store
        for attempt in range(3):
            status = rollouts.statuses()
            self._check_workers(status)
            mode = SyncPath.object_store if fallback else self.path
            try:
                nbytes = self._transfer(mode, rollouts)
                break
            except Exception as e:
                if isinstance(e, self.backend.actor_errors):
                    # a worker's load failing because its input (the learner's export) is gone is the learner's
                    # death (Ray reports it as the worker's task error): LearnerFailure, which rebuilds the learner
                    self.learner.check_alive("the weight sync")
                if isinstance(e, LearnerFailure) or (mode in (SyncPath.object_store, SyncPath.in_process) and (
                        attempt == 2 or not isinstance(e, self.backend.actor_errors))):
                    raise
                print(f"[maskgrpo] {mode} weight sync failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      f"retrying through the object store", flush=True)
                self._group_ready = False
                fallback = True                  # for this sync; the next one tries the chosen path again
        return SyncStats(time.perf_counter() - t0, nbytes, str(mode))

    def _check_workers(self, status: dict[int, dict[str, Any]]) -> None:
        """The workers' dtype; a changed membership (a worker restarted or left) re-chooses the path."""
        # Sender and receivers plan the buckets with one dtype: the workers' (e.g. a bf16 learner sending to fp32
        # workers converts on the way).
        dtypes = {s.get("dtype") for s in status.values()}
        if len(dtypes) != 1:
            raise RuntimeError(f"rollout workers hold their weights in different dtypes {sorted(map(str, dtypes))}")
        self.weight_dtype = dtypes.pop()
        pids = {i: s["pid"] for i, s in status.items()}
        if pids != self._worker_pids:            # a worker (re)started or left: its group membership is gone
            self._group_ready = False
            self._worker_pids = pids
            self.path = None
        if self.path is None or self.cluster_cfg.weight_sync != self._configured:
            self._choose(status)

    def _choose(self, status: dict[int, dict[str, Any]]) -> None:
        if self.backend.name == "local":
            path, backend, why = SyncPath.in_process, "", "the local backend: learner and workers share this process"
        else:
            path, backend, why = choose_sync_path(self.cluster_cfg.weight_sync, self.learner.location(),
                                                  {i: s["location"] for i, s in status.items()})
        if (path, backend) != self._logged:
            print(f"[maskgrpo] weight sync: {path}{f' ({backend})' if backend else ''}: {why}", flush=True)
            self._logged = (path, backend)
        self.path, self.collective_backend = path, backend
        self._configured = self.cluster_cfg.weight_sync

    def _transfer(self, mode: SyncPath, rollouts: "RolloutFleet") -> float:
        """Move the weights by `mode`; returns the bytes sent."""
        get, learner, dtype, size = self._get, self.learner, self.weight_dtype, self.bucket_bytes
        if mode == SyncPath.in_process:
            rank0 = self.backend.obj(learner.ranks[0])
            return [self.backend.obj(w).load_weights(rank0.iter_weight_buckets(size, dtype))
                    for w in rollouts.workers.values()][0]
        if mode == SyncPath.cuda_ipc:
            shared = learner.get(learner.call("share_weights_ipc", size, dtype), "the weight sync")[0]
            try:
                get(list(rollouts.call("receive_weights_ipc", shared["buckets"]).values()))
            finally:
                learner.get(learner.call_rank0("release_ipc"), "the weight sync")
            return shared["bytes"]
        if mode == SyncPath.collective:
            if not self._group_ready:
                self._form_group(rollouts)
            sent = learner.call("broadcast_weights", size, dtype)
            received = list(rollouts.call("receive_weights", learner.version, size, dtype).values())
            return get(sent + received)[0]["bytes"]
        buckets = learner.export(size, dtype)
        return get(list(rollouts.call("load_weights", buckets).values()))[0]

    def _get(self, futures: list[Any]) -> list[Any]:
        """Wait for a transfer's calls (learner and workers) up to cluster.sync_timeout_s, checking every
        cluster.poll_s that the learner ranks are alive (a dead rank: LearnerFailure, not a fallback); a member
        that failed fails the transfer at once, not at the deadline."""
        limit = self.cluster_cfg.sync_timeout_s
        wait_all(self.backend, futures, Wait(
            "the weight hand-over", self.cluster_cfg.poll_s, limit, lambda: self.learner.check_alive("the weight sync"),
            lambda s: FleetError(f"a weight transfer to the rollout workers did not finish within "
                                 f"cluster.sync_timeout_s={limit:g} s (a slow network or a stuck worker: `ray "
                                 f"status`); raise cluster.sync_timeout_s or set cluster.weight_sync=object_store")),
                 fail_fast=True)
        return self.backend.get(futures)

    def _form_group(self, rollouts: "RolloutFleet") -> None:
        self._group_epoch += 1
        ids = sorted(rollouts.workers)
        learner = self.learner
        name = f"wsync{self._group_epoch}-{id(self):x}"      # unique also across a rebuilt learner group
        spec = learner.get(learner.call_rank0("open_sync_group", name, len(ids) + 1,
                                              self.collective_backend), "the weight sync")
        self._get(learner.call("join_sync_group", spec) +
                  [self.backend.call(rollouts.workers[i], "join_sync_group", spec, rank)
                   for rank, i in enumerate(ids, start=1)])
        self._group_ready = True
