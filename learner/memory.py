"""How many (trajectory, step) rows go into one micro-batch, and whether activations are recomputed
(gradient checkpointing), chosen from the GPU's free memory when the config says ``auto``.

A trained row holds a whole image sequence's activations: at Show-o-512 shapes (1024 image tokens, 24 layers,
hidden 2048) about 2.7 GiB without checkpointing and 0.28 GiB with it (each family estimates its own:
`MaskedModel.activation_bytes_per_row`), so a fixed setting
either wastes a large GPU or runs out of memory on a small or shared one (`configs/one_gpu.yaml` puts three
roles on one GPU). The estimate is rough; the plan uses `MEMORY_SHARE` of the free memory and keeps the rest
for what it misses, the allocator's fragmentation, the proximal/reference forwards and the weight export.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

MEMORY_SHARE = 0.6          # of the free memory (device free + PyTorch's cached, unused blocks)
CPU_ROWS = 64               # `auto` rows on the CPU (no memory reading; the CPU default so far)
MAX_AUTO_ROWS = 128         # beyond this a bigger micro-batch no longer speeds up the matrix products
MIN_ROWS_WITHOUT_RECOMPUTE = 16  # `auto` checkpointing turns on when fewer rows than this fit without it
FIRST_UPDATE_BYTES_PER_PARAM = 16   # grads + fp32 grads + AdamW moments, allocated by the first update


def trainable_numel(model: torch.nn.Module) -> int:
    """Parameters that get gradients and optimizer state (with LoRA only the adapters), counted whole under ZeRO-3
    (``ds_numel``): what the first update allocates `FIRST_UPDATE_BYTES_PER_PARAM` bytes for."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory a micro-batch can use on `device` (None on the CPU: not read there). Device-wide, so what other
    processes on the same GPU hold is already subtracted."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


@dataclass(frozen=True)
class MicroBatchPlan:
    rows: int               # most rows per forward/backward
    checkpointing: bool     # recompute each layer's activations in the backward pass
    why: str                # one line for the log

    def __str__(self) -> str:
        return f"{self.rows} rows per micro-batch, checkpointing {'on' if self.checkpointing else 'off'} ({self.why})"


def plan_micro_batches(bytes_per_row: Callable[[bool], float], rows: int, checkpointing: Optional[bool],
                       free: Optional[int], reserved: int = 0) -> MicroBatchPlan:
    """`bytes_per_row(checkpointing)`: the model's activation estimate per trained row
    (`MaskedModel.activation_bytes_per_row`); `rows` 0 = auto; `checkpointing` None = auto; `free` from
    `free_bytes` (None on the CPU); `reserved`: bytes that are free now but that the next update will allocate
    anyway (optimizer state before the first update)."""
    if rows > 0 and checkpointing is not None:
        return MicroBatchPlan(rows, checkpointing, "as configured")
    if free is None:
        return MicroBatchPlan(rows or CPU_ROWS, bool(checkpointing), "CPU: no memory reading")
    budget = max(0.0, MEMORY_SHARE * free - reserved)
    fit_plain = int(budget // bytes_per_row(False))
    fit_ckpt = int(budget // bytes_per_row(True))
    if checkpointing is None:
        checkpointing = fit_plain < (rows or MIN_ROWS_WITHOUT_RECOMPUTE)
    fit = fit_ckpt if checkpointing else fit_plain
    why = f"{free / 2**30:.1f} GiB free"
    if reserved:
        why += f", {reserved / 2**30:.1f} GiB of it kept for the first update's optimizer state"
    why += f", {bytes_per_row(checkpointing) / 2**30:.2f} GiB per row estimated: {fit} fit"
    if fit < 1 and not reserved:
        why += " (not even one: expect an out-of-memory error; free GPU memory or shrink the model)"
    return MicroBatchPlan(rows or max(1, min(MAX_AUTO_ROWS, fit)), checkpointing, why)
