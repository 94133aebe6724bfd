"""Getting the learner's weights to the rollout workers: a broadcast group, or CUDA IPC on a shared GPU.

A weight-broadcast group spans learner rank 0 and the rollout workers.

It is a stand-alone torch c10d process group (gloo on CPU, NCCL on GPUs) built on its own TCPStore, so it never
touches the learner's default (DeepSpeed) process group — `ray.util.collective`'s gloo backend reuses
torch's default group, which the learner already owns. Sender and receivers derive the same bucket plan from
the same architecture (`learner.weights_export.plan_buckets`), so only the flat buffers travel.
"""
from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Iterable, Optional

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


# ----- choosing the path, and CUDA IPC for a rollout worker on the learner's own GPU -----------------------------
class SyncPath(StrEnum):
    collective = "collective"       # a broadcast group: NCCL when every member has its own GPU, else gloo
    cuda_ipc = "cuda_ipc"           # the workers share the learner's GPU: they open its buffers, no host copy
    object_store = "object_store"   # buckets through Ray's object store (host memory)
    in_process = "in_process"       # the local backend: learner and workers share this process, buckets applied
                                    # straight from the learner's device


@dataclass(frozen=True)
class DeviceLocation:
    """Where an actor computes: its node, and the UUIDs of the GPUs it uses (none on the CPU)."""
    node: str
    gpus: tuple[str, ...] = ()

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpus)


def node_address() -> str:
    """This node's address as Ray sees it; 127.0.0.1 in a process that runs without Ray (the local backend)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return "127.0.0.1"
    return ray.util.get_node_ip_address()


def device_location(device: torch.device) -> DeviceLocation:
    """This process's location (the node's IP address as Ray sees it; the GPU's UUID on CUDA)."""
    node = node_address()
    if device.type != "cuda":
        return DeviceLocation(node)
    return DeviceLocation(node, (str(torch.cuda.get_device_properties(device).uuid),))


def choose_sync_path(configured: str, learner: DeviceLocation,
                     workers: dict[int, DeviceLocation]) -> tuple[SyncPath, str, str]:
    """(path, collective backend, the reason in words) for sending the learner's weights to `workers`.

    NCCL cannot form a group of two processes on one GPU, so workers on the learner's GPU get CUDA IPC handles;
    when only some of them share it (a mixed placement) everything goes through the object store."""
    if configured == SyncPath.object_store:
        return SyncPath.object_store, "", "cluster.weight_sync=object_store"
    shared = sorted(i for i, w in workers.items()
                    if learner.on_gpu and w.node == learner.node and set(w.gpus) & set(learner.gpus))
    if shared and len(shared) == len(workers):
        return SyncPath.cuda_ipc, "", (f"rollout worker(s) {shared} share the learner's GPU {learner.gpus[0]}: "
                                       f"CUDA IPC handles, no copy through host memory")
    if shared:
        return SyncPath.object_store, "", (f"rollout worker(s) {shared} share the learner's GPU and the others do "
                                           f"not: NCCL cannot include the former, so the object store for all")
    if learner.on_gpu and all(w.on_gpu for w in workers.values()):
        return SyncPath.collective, "nccl", "every rollout worker has its own GPU: an NCCL broadcast group"
    return SyncPath.collective, "gloo", "a gloo broadcast group (a member computes on the CPU)"


@dataclass
class IpcBucket:
    """A weight bucket that stays in the learner's GPU memory: its description and a CUDA IPC handle."""
    version: int
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    index: int
    gpu_uuid: str
    rebuild: Any                   # torch's rebuild function for the shared tensor ...
    arguments: dict[str, Any]      # ... and its arguments by parameter name (the device index is the sender's)


def _named_handle(flat: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """`reduce_tensor(flat)` with its arguments named after the rebuild function's parameters, so the receiver
    can replace the device index by name (a torch release that renames it fails here, loudly)."""
    import inspect
    from torch.multiprocessing.reductions import reduce_tensor
    rebuild, args = reduce_tensor(flat)
    names = list(inspect.signature(rebuild).parameters)
    if DEVICE_ARGUMENT not in names:
        raise RuntimeError(f"CUDA IPC: torch's {rebuild.__name__} has no {DEVICE_ARGUMENT!r} parameter in this torch "
                           f"release ({torch.__version__}); use cluster.weight_sync=object_store")
    return rebuild, dict(zip(names, args))


DEVICE_ARGUMENT = "storage_device"     # the device index of torch's rebuild_cuda_tensor


def share_buckets(buckets: Iterable[WeightBucket]) -> tuple[list[IpcBucket], list[torch.Tensor]]:
    """IPC handles of the buckets' GPU buffers, and the buffers (the sender keeps them alive until every receiver
    has copied them)."""
    shared, keep = [], []
    for b in buckets:
        if not b.flat.is_cuda:
            raise RuntimeError("CUDA IPC needs the learner's weight buckets on its GPU")
        keep.append(b.flat)
        rebuild, arguments = _named_handle(b.flat)
        shared.append(IpcBucket(b.version, b.names, b.shapes, b.dtypes, b.index,
                                str(torch.cuda.get_device_properties(b.flat.device).uuid), rebuild, arguments))
    torch.cuda.synchronize()
    return shared, keep


def _local_index(gpu_uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == gpu_uuid:
            return i
    raise RuntimeError(f"this process does not see GPU {gpu_uuid}: CUDA IPC needs the learner's own GPU")


def open_bucket(bucket: IpcBucket) -> WeightBucket:
    """The bucket as a tensor aliasing the learner's GPU memory (the device index is this process's own for the
    same physical GPU: Ray numbers each actor's visible GPUs from 0)."""
    flat = bucket.rebuild(**{**bucket.arguments, DEVICE_ARGUMENT: _local_index(bucket.gpu_uuid)})
    return WeightBucket(bucket.version, bucket.names, bucket.shapes, bucket.dtypes, flat, bucket.index)
