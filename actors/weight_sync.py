"""A weight-broadcast group spanning learner rank 0 and the rollout workers.

It is a stand-alone torch c10d process group (gloo on CPU, NCCL on GPUs) built on its own TCPStore, so it never
touches the learner's default (DeepSpeed) process group — `ray.util.collective`'s gloo backend reuses
torch's default group, which the learner already owns. Sender and receivers derive the same bucket plan from
the same architecture (`learner.weights_export.plan_buckets`), so only the flat buffers travel.
"""
from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from learner.weights_export import WeightBucket, apply_weight_bucket, plan_buckets


@dataclass(frozen=True)
class SyncGroupSpec:
    """What every member needs to join: rank 0 (the learner) hosts the store at addr:port."""
    name: str
    addr: str
    port: int
    world_size: int
    backend: str          # "gloo" | "nccl"
    timeout_s: float = 120.0


class WeightSyncGroup:
    def __init__(self, spec: SyncGroupSpec, rank: int):
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        store = dist.TCPStore(spec.addr, spec.port, spec.world_size, is_master=(rank == 0), timeout=timeout)
        self._store = dist.PrefixStore(spec.name, store)
        self.spec, self.rank = spec, rank
        if spec.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(self._store, rank, spec.world_size)
        elif spec.backend == "gloo":
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(self._store, rank, spec.world_size, timeout)
        else:
            raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', not {spec.backend!r}")

    def broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()

    def send(self, buckets: Iterable[WeightBucket]) -> dict[str, float]:
        """Rank 0: broadcast every bucket's flat buffer (device buckets go out as they are on NCCL; gloo takes
        CPU buffers). Returns bytes and seconds."""
        t0, nbytes = time.perf_counter(), 0
        for bucket in buckets:
            flat = bucket.flat.to(self.device)
            self.broadcast(flat)
            nbytes += bucket.nbytes
        return {"bytes": float(nbytes), "seconds": time.perf_counter() - t0}

    def receive(self, model: nn.Module, bucket_bytes: int, dtype: Optional[torch.dtype], version: int) -> int:
        """Ranks > 0: receive every bucket into `model` (same plan as the sender's). One receive buffer per dtype,
        sized for the largest bucket, is reused for every bucket (the apply's copies are ordered before the next
        broadcast writes it: NCCL's stream waits for the current one, gloo is synchronous)."""
        plan = plan_buckets(model, bucket_bytes, dtype)
        layouts = []
        sizes: dict[torch.dtype, int] = {}
        for members in plan:
            dt = dtype or members[0][1].dtype
            shapes = [tuple(p.shape) for _, p in members]
            numel = sum(math.prod(s) for s in shapes)
            layouts.append((dt, shapes, numel))
            sizes[dt] = max(sizes.get(dt, 0), numel)
        buffers = {dt: torch.empty(numel, dtype=dt, device=self.device) for dt, numel in sizes.items()}
        for index, (members, (dt, shapes, numel)) in enumerate(zip(plan, layouts)):
            flat = buffers[dt][:numel]
            self.broadcast(flat)
            apply_weight_bucket(model, WeightBucket(version, [n for n, _ in members], shapes,
                                                    [str(dt)] * len(members), flat, index, index == len(plan) - 1))
        return version


def param_digest(model: nn.Module) -> str:
    """A hash of every parameter's bytes (float32), to check that two copies of the policy are identical."""
    import hashlib
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
