"""Moving the learner's weights to rollout workers in bounded-size buckets.

The sender walks the policy's parameters in order, gathers each one (under ZeRO-3 every rank must take part:
`deepspeed.zero.GatheredParameters`), and packs them into flat buffers of at most `bucket_bytes` (one dtype per
bucket; a single parameter larger than the bucket travels alone). Only rank 0 yields; the other ranks run the
generator to the end for the collectives. Peak extra memory is one bucket plus one gathered parameter.

Buckets stay on the parameters' device by default (flat GPU buffers on a GPU learner): an NCCL broadcast or an
in-process apply then never goes through the host, and the receiving side copies device to device. Only the
object-store path needs CPU tensors: a bucket moves its buffer to the CPU when it is pickled (``ray.put``), or
explicitly with ``bucket.to("cpu")``.

A policy with LoRA adapters (`learner.lora`) syncs only its adapter tensors (``adapters_only``; by default whenever
the module has adapters): the rollout workers hold the same adapter layout on the same frozen base, so the adapters
are all that changes. Sender and receiver derive the same plan from their own module (`plan_buckets`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
from torch import nn


@dataclass
class WeightBucket:
    """A slice of the policy's parameters in the released key layout, as one flat tensor."""
    version: int                      # learner weight version (optimizer steps applied)
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]                 # e.g. "torch.bfloat16" (all equal to flat.dtype)
    flat: torch.Tensor                # 1-D, the parameters concatenated in `names` order (any device)
    index: int = 0                    # bucket number within this export
    last: bool = False                # the final bucket of this export

    def to(self, device: torch.device | str) -> "WeightBucket":
        """The same bucket with its buffer on `device` (itself when it is there already)."""
        if self.flat.device == torch.device(device):
            return self
        return replace(self, flat=self.flat.to(device))

    def __getstate__(self) -> dict:
        # Pickling (the object store) always carries a CPU buffer: a receiver may have no GPU, or another one.
        state = dict(self.__dict__)
        state["flat"] = self.flat.detach().cpu()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, view) pairs unpacked from the flat buffer."""
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            n = 1
            for s in shape:
                n *= s
            yield name, self.flat[offset:offset + n].view(shape)
            offset += n


def _gathered(param: nn.Parameter):
    if hasattr(param, "ds_id"):
        import deepspeed
        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def _full_shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def synced_parameters(module: nn.Module, adapters_only: Optional[bool] = None) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs a weight sync moves: the LoRA adapters only (`adapters_only`; None: whenever
    `module` has adapters), else every parameter; in `named_parameters` order."""
    from .lora import adapter_parameters, has_adapters
    if adapters_only is None:
        adapters_only = has_adapters(module)
    if not adapters_only:
        return list(module.named_parameters())
    params = adapter_parameters(module)
    if not params:
        raise ValueError("adapters_only=True but the model has no LoRA adapters (learner.lora.rank is 0)")
    return params


def plan_buckets(module: nn.Module, bucket_bytes: int, dtype: Optional[torch.dtype] = None,
                 adapters_only: Optional[bool] = None) -> list[list[tuple[str, nn.Parameter]]]:
    """Split the synced parameters (`synced_parameters`), in order, into runs of one dtype whose total size stays
    within `bucket_bytes`."""
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be > 0")
    plan: list[list[tuple[str, nn.Parameter]]] = []
    size, current_dtype = 0, None
    for name, param in synced_parameters(module, adapters_only):
        dt = dtype or param.dtype
        nbytes = math.prod(_full_shape(param)) * torch.empty((), dtype=dt).element_size()
        if not plan or size + nbytes > bucket_bytes or dt != current_dtype:
            if not plan or plan[-1]:
                plan.append([])
            size, current_dtype = 0, dt
        plan[-1].append((name, param))
        size += nbytes
    return [b for b in plan if b]


def iter_weight_buckets(module: nn.Module, bucket_bytes: int, version: int, rank: int = 0,
                        dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None,
                        adapters_only: Optional[bool] = None) -> Iterator[WeightBucket]:
    """Yield `module`'s synced parameters (every one, or with LoRA the adapters: `synced_parameters`) in buckets of
    at most `bucket_bytes` (rank 0 yields; see module doc).

    `dtype` converts on the way (e.g. bf16 for the rollout engines); default: the training dtype. `device`: where
    the buffers live; default: the parameters' device (no host round trip on a GPU). Every bucket is a fresh
    tensor, so a consumer may keep it (e.g. in an object store) while the next one is built.
    """
    plan = plan_buckets(module, bucket_bytes, dtype, adapters_only)
    for index, members in enumerate(plan):
        dt = dtype or members[0][1].dtype
        dev = torch.device(device) if device is not None else members[0][1].device
        shapes = [_full_shape(p) for _, p in members]
        flat = torch.empty(sum(math.prod(s) for s in shapes), dtype=dt, device=dev) if rank == 0 else None
        offset = 0
        for (name, param), shape in zip(members, shapes):
            n = math.prod(shape)
            with _gathered(param):
                if flat is not None:
                    flat[offset:offset + n].copy_(param.data.detach().reshape(-1))
            offset += n
        if flat is not None:
            yield WeightBucket(version, [n for n, _ in members], shapes, [str(dt)] * len(members), flat,
                               index, index == len(plan) - 1)


@torch.no_grad()
def apply_weight_bucket(model: nn.Module, bucket: WeightBucket) -> int:
    """Copy a bucket into `model`'s parameters (receiving side); returns the bucket's version.

    Raises KeyError / ValueError naming the parameter when the bucket does not fit the model.
    """
    params = dict(model.named_parameters())
    for name, value in bucket.tensors():
        if name not in params:
            raise KeyError(f"weight bucket {bucket.index} (version {bucket.version}) has parameter {name!r} that "
                           f"the receiving model does not have: the learner and rollout models differ (with LoRA "
                           f"both must be built with the same learner.lora settings)")
        p = params[name]
        if tuple(p.shape) != tuple(value.shape):
            raise ValueError(f"weight bucket parameter {name!r}: shape {tuple(value.shape)} != receiving model's "
                             f"{tuple(p.shape)}")
        p.data.copy_(value)          # one copy, converting device and dtype on the way (device to device on GPUs)
    return bucket.version
