"""Learner ranks as Ray actors: a DeepSpeed data-parallel world, one actor per GPU (or CPU process).

Each actor sets the usual RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT before building its `learner.Learner`; rank 0
also hosts the weight-sync store and sends the weights. Trajectories arrive as object references, fetched here.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Iterator, Optional, Sequence

import torch

from algorithm.config import AlgorithmConfig
from learner.config import LearnerConfig
from learner.dist import free_port
from learner.engine import Learner
from learner.update import GroupUpdate, UpdateStats
from learner.weights_export import WeightBucket
from policy.trajectory import Trajectory
from policy.factory import PolicyConfig, learner_bf16, load_policy

from .weight_sync import (DeviceLocation, SyncGroupSpec, WeightSyncGroup, device_location, node_address, param_digest,
                          share_buckets)


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, policy_cfg: PolicyConfig,
                 learner_cfg: LearnerConfig, algorithm: AlgorithmConfig, device: str = "cpu", seed: int = 0,
                 num_threads: Optional[int] = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        torch.manual_seed(seed)
        self.rank = rank
        # The learner computes in the precision the rollout workers sample in (policy.dtype); it keeps fp32
        # master weights and lets DeepSpeed cast the forward to bf16.
        learner_cfg = replace(learner_cfg, bf16=learner_bf16(policy_cfg, device, learner_cfg.bf16))
        model = load_policy(policy_cfg, "cpu", with_decoder=False, dtype=torch.float32).model
        self.learner = Learner(model, learner_cfg, algorithm, device=device)
        self.sync_group: Optional[WeightSyncGroup] = None
        self._ipc_keep: list[torch.Tensor] = []

    @staticmethod
    def rendezvous() -> tuple[str, int]:
        """Address and a free port on this node, for rank 0's process group (call on rank 0's node)."""
        return node_address(), free_port("")

    def version(self) -> int:
        return self.learner.version

    def digest(self) -> tuple[int, str]:
        return self.learner.version, param_digest(self.learner.policy)

    def train_step(self, groups: Sequence[GroupUpdate], *trajectories: Trajectory) -> UpdateStats:
        """This rank's groups; group i's trajectory is `trajectories[i]` (passed as a top-level argument, so the
        backend fetches it from the object store before the call)."""
        started = time.time()
        stats = self.learner.train_step([replace(g, trajectory=t) for g, t in zip(groups, trajectories)])
        stats.started, stats.finished = started, time.time()
        return stats

    # ----- weights ----------------------------------------------------------------------------------------------
    def open_sync_group(self, name: str, world_size: int, backend: str, timeout_s: float = 120.0) -> SyncGroupSpec:
        """Rank 0: choose the store address for a new weight-sync group (joined by `join_sync_group`)."""
        addr, port = node_address(), free_port("")
        return SyncGroupSpec(name, addr, port, world_size, backend, timeout_s)

    def join_sync_group(self, spec: SyncGroupSpec) -> bool:
        if self.rank == 0:
            self.sync_group = WeightSyncGroup(spec, 0)
        return True

    def broadcast_weights(self, bucket_bytes: int, dtype: Optional[str] = None) -> dict[str, float]:
        """All ranks: gather the full weights bucket by bucket; rank 0 broadcasts them to the rollout workers."""
        buckets = self.iter_weight_buckets(bucket_bytes, dtype)
        if self.rank != 0:
            for _ in buckets:
                pass
            return {"bytes": 0.0, "seconds": 0.0}
        if self.sync_group is None:
            raise RuntimeError("no weight-sync group: call join_sync_group first")
        stats = self.sync_group.send(buckets)
        stats["version"] = float(self.learner.version)
        return stats

    def location(self) -> DeviceLocation:
        return device_location(self.learner.device)

    def share_weights_ipc(self, bucket_bytes: int, dtype: Optional[str] = None) -> dict[str, Any]:
        """All ranks (gathering); rank 0 keeps the buckets in its GPU memory and returns CUDA IPC handles to them,
        for rollout workers on the same GPU (`release_ipc` once they have copied them)."""
        buckets = self.iter_weight_buckets(bucket_bytes, dtype)
        if self.rank != 0:
            for _ in buckets:
                pass
            return {"buckets": [], "bytes": 0.0}
        shared, self._ipc_keep = share_buckets(buckets)
        return {"buckets": shared, "bytes": float(sum(t.numel() * t.element_size() for t in self._ipc_keep))}

    def release_ipc(self) -> None:
        self._ipc_keep = []

    def export_weights(self, bucket_bytes: int, dtype: Optional[str] = None) -> list[WeightBucket]:
        """All ranks (gathering); rank 0 returns the buckets in host memory (the object-store path: this call's
        result is what travels), the other ranks an empty list."""
        return [bucket.to("cpu") for bucket in self.iter_weight_buckets(bucket_bytes, dtype)]

    def iter_weight_buckets(self, bucket_bytes: int, dtype: Optional[str] = None) -> Iterator[WeightBucket]:
        """The weights on the learner's device (the in-process path applies them as they come)."""
        return self.learner.iter_weight_buckets(bucket_bytes, getattr(torch, dtype) if dtype else None)

    # ----- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self, root: str, driver_state: Optional[dict[str, Any]] = None) -> Optional[str]:
        if driver_state is not None:
            self.learner.driver_state = driver_state
        path = self.learner.save_checkpoint(root)
        return str(path) if path is not None else None

    def resume(self, path: str) -> dict[str, Any]:
        loaded = self.learner.resume(path)
        return {"path": str(loaded), "version": self.learner.version,
                "driver_state": getattr(self.learner, "driver_state", None)}
