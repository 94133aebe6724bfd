"""Benchmarks: scripts that print figures (never timed tests). `maskgrpo bench <what>` runs one."""
from __future__ import annotations

import importlib
from typing import Sequence


def run_benchmark(what: str, args: Sequence[str]) -> int:
    module = importlib.import_module(f"benchmarks.bench_{what}")
    return int(module.main(list(args)) or 0)
