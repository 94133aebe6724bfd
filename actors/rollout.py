"""Rollout workers: each holds a policy copy and samples groups in one batched unmasking call.

`rollout` returns the groups' metadata first and then one `Trajectory` per group as separate return values
(`num_returns = 1 + groups`): Ray stores each in the object store and the *caller* owns the references, so a
worker that dies after returning loses nothing, and the driver hands the references on (to reward actors and
learner ranks) without ever reading the trajectories.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import torch

from learner.weights_export import WeightBucket, apply_weight_bucket
from policy.factory import compute_dtype, load_policy, policy_config_from_dict
from policy.sampler import SamplerConfig, UnmaskingSampler

from .types import GroupMeta, GroupRequest
from .weight_sync import SyncGroupSpec, WeightSyncGroup, param_digest


class RolloutWorker:
    def __init__(self, worker_id: int, policy_cfg: dict[str, Any], sampler_cfg: dict[str, Any],
                 device: str = "cpu", weight_dtype: Optional[str] = None, num_threads: Optional[int] = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.worker_id = worker_id
        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        pcfg = policy_config_from_dict(policy_cfg)
        # parameters in policy.dtype's compute dtype on this device: the learner computes in the same one
        self.policy = load_policy(pcfg, self.device, with_decoder=False)
        self.model = self.policy.model.eval().requires_grad_(False)
        if weight_dtype and getattr(torch, weight_dtype) != compute_dtype(pcfg.dtype, self.device):
            raise ValueError(f"rollout weight_dtype={weight_dtype!r} differs from policy.dtype={pcfg.dtype!r} "
                             f"({compute_dtype(pcfg.dtype, self.device)} on {self.device}): set policy.dtype "
                             f"instead, so that rollout workers and learner compute in the same precision")
        self.sampler_cfg = SamplerConfig(**sampler_cfg)
        self.version = 0             # policy.init's weights: the learner starts from the same ones
        self.sync_group: Optional[WeightSyncGroup] = None
        self.sync_rank = -1

    # ----- status ------------------------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "version": self.version, "pid": os.getpid(),
                "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}

    def digest(self) -> tuple[int, str]:
        return self.version, param_digest(self.model)

    # ----- sampling ------------------------------------------------------------------------------------------------
    def rollout(self, groups: Sequence[GroupRequest], sampler_overrides: Optional[dict[str, Any]] = None):
        """Sample every group in one batched call. Returns (list[GroupMeta], traj_0, …, traj_{n-1})."""
        cfg = SamplerConfig(**{**self.sampler_cfg.__dict__, **(sampler_overrides or {})})
        sizes = {len(g.seeds) for g in groups}
        if len(sizes) != 1:
            raise ValueError("all groups of one rollout call must have the same group size")
        group_size = sizes.pop()
        t0 = time.perf_counter()
        text = self.policy.text_areas([g.prompt for g in groups])
        seeds = [s for g in groups for s in g.seeds]
        traj = UnmaskingSampler(self.model, cfg).sample(text, seeds, group_size=group_size)
        seconds = time.perf_counter() - t0
        metas, parts = [], []
        for i, g in enumerate(groups):
            part = traj.select(slice(i * group_size, (i + 1) * group_size))
            part.policy_version = self.version
            part.meta = {"group_id": g.group_id, "prompt": g.prompt, "seeds": list(g.seeds)}
            parts.append(part)
            metas.append(GroupMeta(g.group_id, g.step, g.prompt_index, g.prompt, g.metadata, self.version,
                                   self.worker_id, seconds / len(groups)))
        return (metas, *parts)

    # ----- weights ----------------------------------------------------------------------------------------------
    def join_sync_group(self, spec: SyncGroupSpec, rank: int) -> bool:
        self.sync_group = WeightSyncGroup(spec, rank)
        self.sync_rank = rank
        return True

    def receive_weights(self, version: int, bucket_bytes: int, dtype: Optional[str] = None) -> int:
        if self.sync_group is None:
            raise RuntimeError("join_sync_group first")
        self.sync_group.receive(self.model, bucket_bytes, getattr(torch, dtype) if dtype else None, version)
        self.version = version
        return version

    def load_weights(self, bucket_refs: Sequence[Any]) -> int:
        """Object-store path: the learner put the buckets; fetch and apply them."""
        import ray
        version = self.version
        for bucket in ray.get(list(bucket_refs)):
            version = apply_weight_bucket(self.model, bucket)
        self.version = version
        return version
