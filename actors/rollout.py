"""Rollout workers: each holds a policy copy and samples groups in one batched unmasking call.

`rollout` returns the groups' metadata first and then one `Trajectory` per group as separate return values
(`num_returns = 1 + groups`): Ray stores each in the object store and the *caller* owns the references, so a
worker that dies after returning loses nothing, and the driver hands the references on (to reward actors and
learner ranks) without ever reading the trajectories.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any, Iterable, Optional, Sequence

import torch

from algorithm.tree import TreeSpec
from learner.config import LoraSettings
from learner.lora import add_adapters
from learner.weights_export import WeightBucket, apply_weight_bucket
from policy.device import resolve_device
from policy.factory import PolicyConfig, load_policy
from policy.sampler import SamplerConfig, UnmaskingSampler

from .types import GroupMeta, GroupRequest
from .weight_sync import IpcBucket, SyncGroupSpec, WeightSyncGroup, device_location, open_bucket, param_digest


class RolloutWorker:
    def __init__(self, worker_id: int, policy_cfg: PolicyConfig, sampler_cfg: SamplerConfig,
                 device: str = "cpu", num_threads: Optional[int] = None, lora: Optional[LoraSettings] = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.worker_id = worker_id
        self.device = resolve_device(device)
        # parameters in policy.dtype's compute dtype on this device: the learner computes in the same one
        self.policy = load_policy(policy_cfg, self.device, with_decoder=False)
        if lora is not None and lora.enabled:    # the learner's adapter layout: syncs then move only the adapters
            add_adapters(self.policy.model, lora)
        self.model = self.policy.model.eval().requires_grad_(False)
        self.sampler_cfg = sampler_cfg
        self.version = 0             # policy.init's weights: the learner starts from the same ones
        self.sync_group: Optional[WeightSyncGroup] = None

    # ----- status ------------------------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "version": self.version, "pid": os.getpid(),
                "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "location": device_location(self.device)}

    def digest(self) -> tuple[int, str]:
        return self.version, param_digest(self.model)

    # ----- sampling ------------------------------------------------------------------------------------------------
    def rollout(self, groups: Sequence[GroupRequest], sampler_overrides: Optional[dict[str, Any]] = None):
        """Sample every group in one batched call. Returns (list[GroupMeta], traj_0, …, traj_{n-1})."""
        cfg = replace(self.sampler_cfg, **(sampler_overrides or {}))
        trees = {json.dumps(g.tree) for g in groups}
        if len({len(g.seeds) for g in groups}) != 1 or len(trees) != 1:
            raise ValueError("all groups of one rollout call must have the same group size and tree")
        tree = TreeSpec.of(groups[0].tree)
        group_size = tree.leaves if tree is not None else len(groups[0].seeds)
        started = time.time()
        condition = self.policy.condition([g.prompt for g in groups])
        null = self.policy.null_condition(cfg.negative_prompt)      # used only with guidance on
        seeds = [s for g in groups for s in g.seeds]
        traj = UnmaskingSampler(self.model, cfg).sample(condition, seeds, group_size=group_size, null_condition=null,
                                                       tree=tree)
        finished = time.time()
        metas, parts = [], []
        tokens = traj.meta["rollout_tokens"] / len(groups)          # every group of the call has the same shape
        for i, g in enumerate(groups):
            part = traj.select(slice(i * group_size, (i + 1) * group_size))
            part.policy_version = self.version
            part.meta = {"group_id": g.group_id, "prompt": g.prompt, "seeds": list(g.seeds), "tree": g.tree}
            parts.append(part)
            metas.append(GroupMeta(g.group_id, g.step, g.prompt_index, g.prompt, g.metadata, self.version,
                                   self.worker_id, started, finished, tokens,
                                   {"self_certainty": part.self_certainty.tolist()}))
        return (metas, *parts)

    # ----- weights ----------------------------------------------------------------------------------------------
    def join_sync_group(self, spec: SyncGroupSpec, rank: int) -> bool:
        self.sync_group = WeightSyncGroup(spec, rank)
        return True

    def receive_weights(self, version: int, bucket_bytes: int, dtype: Optional[str] = None) -> int:
        if self.sync_group is None:
            raise RuntimeError("join_sync_group first")
        self.sync_group.receive(self.model, bucket_bytes, getattr(torch, dtype) if dtype else None, version)
        self.version = version
        return version

    def receive_weights_ipc(self, buckets: Sequence[IpcBucket]) -> int:
        """CUDA IPC path (this worker shares the learner's GPU): copy from the learner's buffers, device to device."""
        version = self.version
        for shared in buckets:
            version = apply_weight_bucket(self.model, open_bucket(shared))
        torch.cuda.synchronize(self.device)
        self.version = version
        return version

    def load_weights(self, buckets: Iterable[WeightBucket]) -> float:
        """Object-store path (the buckets arrive as this call's argument, fetched by the backend) and the
        in-process path (the learner's own buckets, on its device, applied as they are made). Returns the bytes
        applied."""
        version, nbytes = self.version, 0.0
        for bucket in buckets:
            version = apply_weight_bucket(self.model, bucket)
            nbytes += bucket.nbytes
        self.version = version
        return nbytes
