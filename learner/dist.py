"""The data-parallel process group of the learner ranks, and small collectives that work with one rank too.

Ranks are started by the cluster code (one process per GPU, or several CPU processes) with the usual
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` environment; a lone process needs none.
The backend is NCCL with CUDA and gloo on the CPU (``DS_ACCELERATOR=cpu``).
"""
from __future__ import annotations

import importlib
import os
import socket
from typing import Any

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on `host` ("" = every interface, for rendezvous across nodes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_distributed(device: torch.device = torch.device("cpu")) -> None:
    """Join (or create) the default process group through DeepSpeed (NCCL on CUDA, gloo on the CPU); idempotent.
    On the CPU, DeepSpeed's CPU accelerator is chosen before DeepSpeed is first imported."""
    if dist.is_available() and dist.is_initialized():
        return
    use_cuda = device.type == "cuda"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT of rank 0")
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel at every first start (about a
        # minute, and again whenever the build environment differs, e.g. inside Ray actors). gloo's all-reduce
        # is all the learner needs on a CPU, so skip the kernel (the backend falls back when it is None). The module
        # is taken from sys.modules: `import deepspeed.comm.torch as m` binds the *torch* package, because
        # deepspeed.comm re-exports a name `torch` that shadows its submodule (the patch used to miss).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Leave the default process group once every rank has reached this point. A process that exits with its gloo
    group alive tears the group's threads down during interpreter shutdown, racing a peer that is still closing
    its side; that race can abort the process ("terminate called without an active exception", SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum / max / min of a list of floats over all ranks (float64)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu().tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
