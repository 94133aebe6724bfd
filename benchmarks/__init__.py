"""Benchmarks: scripts that print figures (never timed tests). `maskgrpo bench <what>` runs one."""
from __future__ import annotations

import importlib
from typing import Sequence


def run_benchmark(what: str, args: Sequence[str]) -> int:
    """Run `benchmarks.bench_<what>.main(args)`; every bench's main takes its argv. Returns the exit code (a main
    that returns its results instead of a code, such as bench_learner's, succeeded: 0)."""
    module = importlib.import_module(f"benchmarks.bench_{what}")
    result = module.main(list(args))
    return result if isinstance(result, int) else 0
