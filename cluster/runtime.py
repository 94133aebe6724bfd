"""Process-level settings shared by every entry point: device choice, seeding, CPU DeepSpeed."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_deepspeed_env() -> None:
    """DeepSpeed on a machine without CUDA needs its CPU accelerator chosen before it is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
