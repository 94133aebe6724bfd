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
                  on_lost: Optional[Callable[[str], None]] = None) -> threading.Event:
    """A daemon thread that ends this process when its Ray cluster has been unreachable for `lost_after_s`
    seconds (a stopped head would otherwise leave the driver of a submitted job waiting forever). Set the
    returned event to stop watching (e.g. before this process shuts Ray down itself)."""
    import ray
    ping = ping or ray.nodes
    on_lost = on_lost or _exit_lost

    def ping_once() -> bool:
        """True when the cluster answered within the poll interval (the call may hang: it runs aside)."""
        box: list[bool] = []

        def call() -> None:
            try:
                ping()
                box.append(True)
            except Exception:
                pass
        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(timeout=max(poll_s, 1.0))
        return bool(box)

    stop = threading.Event()

    def loop() -> None:
        last_ok = time.monotonic()
        while not stop.is_set():
            ok = ping_once()
            now = time.monotonic()
            if ok:
                last_ok = now
            elif now - last_ok >= lost_after_s and not stop.is_set():
                on_lost(f"the Ray cluster has been unreachable for {now - last_ok:.0f} s (its head stopped?): this "
                        f"driver exits; start the cluster again and resume with resume=auto")
                return
            stop.wait(poll_s)

    threading.Thread(target=loop, name="maskgrpo-cluster-watch", daemon=True).start()
    return stop


def _exit_lost(message: str) -> None:
    print(f"[maskgrpo] {message}", file=sys.stderr, flush=True)
    os._exit(1)
