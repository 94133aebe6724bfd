"""Process-level settings shared by every entry point: seeding, CPU DeepSpeed."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_deepspeed_env() -> None:
    """DeepSpeed on a machine without CUDA needs its CPU accelerator chosen before it is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
