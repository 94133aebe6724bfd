"""Process-level settings shared by every entry point: seeding, CPU DeepSpeed, watching the cluster."""
from __future__ import annotations

import os
import random
import sys
import threading
import time
from typing import Any, Callable, Optional

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


def watch_cluster(lost_after_s: float, poll_s: float = 5.0, ping: Optional[Callable[[], Any]] = None,
                  on_lost: Optional[Callable[[str], None]] = None) -> threading.Thread:
    """A daemon thread that ends this process when its Ray cluster has been unreachable for `lost_after_s`
    seconds (a stopped head would otherwise leave the driver of a submitted job waiting forever)."""
    import ray
    ping = ping or ray.nodes
    on_lost = on_lost or _exit_lost

    def ping_once() -> bool:
        box: list[bool] = []
        t = threading.Thread(target=lambda: box.append(bool(ping()) or True), daemon=True)
        t.start()
        t.join(timeout=max(poll_s, 1.0))
        return bool(box)

    def loop() -> None:
        last_ok = time.monotonic()
        while True:
            try:
                ok = ping_once()
            except Exception:
                ok = False
            now = time.monotonic()
            if ok:
                last_ok = now
            elif now - last_ok >= lost_after_s:
                on_lost(f"the Ray cluster has been unreachable for {now - last_ok:.0f} s (its head stopped?): this "
                        f"driver exits; start the cluster again and resume with resume=auto")
                return
            time.sleep(poll_s)

    thread = threading.Thread(target=loop, name="maskgrpo-cluster-watch", daemon=True)
    thread.start()
    return thread


def _exit_lost(message: str) -> None:
    print(f"[maskgrpo] {message}", file=sys.stderr, flush=True)
    os._exit(1)
