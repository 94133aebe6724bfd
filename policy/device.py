"""Where a process computes: the one device picker every role and command uses."""
from __future__ import annotations

import torch


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """"auto"/None → CUDA when this process sees a GPU, else the CPU; "cuda" without a visible GPU is an error
    that says what to do."""
    if isinstance(choice, torch.device):
        choice = str(choice)
    if choice is None or choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} was asked for but this process sees no CUDA device: use device=cpu "
                           f"(or auto), or give the role GPUs (cluster.*_gpus) on a machine that has them")
    return device
