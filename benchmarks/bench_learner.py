"""Learner throughput: (trajectory, step) rows trained per second, and peak memory of a train step.

For T = 8/16/50 unmasking steps, with and without step reduction (first half of the steps) and gradient
checkpointing, on a small random Show-o (one group of G rollouts sampled beforehand; sampling is not timed).
Peak memory: CUDA ``max_memory_allocated``; CPU: the peak resident set size above the pre-step baseline,
sampled every millisecond from /proc/self/statm (glibc's free lists are trimmed first), else ru_maxrss.

    DS_ACCELERATOR=cpu python -m benchmarks.bench_learner            # CPU
    python -m benchmarks.bench_learner --hidden 512 --layers 8       # a GPU
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from algorithm.advantages import GroupOutcome  # noqa: E402
from algorithm.config import AlgorithmConfig  # noqa: E402
from algorithm.plan import Planner  # noqa: E402
from learner import Learner, LearnerConfig  # noqa: E402
from policy.device import resolve_device  # noqa: E402
from benchmarks.tiny_models import random_showo, sample_groups, tiny_showo_config  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak extra memory (bytes) while the block runs."""

    def __enter__(self) -> "PeakMemory":
        self.cuda = resolve_device().type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.extra = max(self.peak, _rss()) - self.base


def run_case(model_state, model_cfg, group, steps: int, reduction: bool, checkpointing: bool, args) -> dict:
    trajs, prompts = group
    model = random_showo(seed=0, config=model_cfg)
    model.load_state_dict(model_state)
    cfg = LearnerConfig(lr=1e-5, warmup_steps=1, zero_stage=args.zero_stage, micro_batch_rows=args.micro_batch_rows,
                        gradient_checkpointing=checkpointing)
    algorithm = AlgorithmConfig(transition=args.transition, selector="first_k" if reduction else "all",
                                select_k=max(1, steps // 2))
    learner = Learner(model, cfg, algorithm, device=resolve_device())
    rewards = [torch.linspace(0.0, 1.0, args.group_size)]
    outcomes = [GroupOutcome(g, p, r, tr.num_steps) for g, (tr, r, p) in enumerate(zip(trajs, rewards, prompts))]
    groups = Planner(algorithm).plan(outcomes, trajs).groups
    learner.train_step(groups)                                       # warm-up
    times, rows, micro = [], 0.0, 0.0
    with PeakMemory() as mem:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m = learner.train_step(groups).metrics()
            if mem.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            rows, micro = m["rows"], m["micro_batches"]
    best = min(times)
    del learner, model
    gc.collect()
    return {"T": steps, "reduction": "first_k" if reduction else "all", "checkpointing": checkpointing,
            "rows": int(rows), "micro_batches": int(micro), "step_s": best, "rows_per_s": rows / best,
            "peak_mb": mem.extra / 2 ** 20}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="image tokens (a square number)")
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[8, 16, 50])
    p.add_argument("--micro-batch-rows", type=int, default=32)
    p.add_argument("--transition", default="candidate1")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    model_cfg = tiny_showo_config(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                  num_vq_tokens=args.tokens, codebook_size=args.codebook)
    base = random_showo(seed=0, config=model_cfg)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    n_params = sum(v.numel() for v in state.values())
    device = resolve_device().type
    print(f"# learner benchmark: {device}, torch threads {torch.get_num_threads()}, model {n_params / 1e6:.2f} M "
          f"params (hidden {args.hidden}, {args.layers} layers, {args.tokens} image tokens), G={args.group_size}, "
          f"micro_batch_rows={args.micro_batch_rows}, ZeRO {args.zero_stage}, {args.transition}")
    results = []
    header = f"{'T':>3} {'reduction':>9} {'ckpt':>5} {'rows':>5} {'micro':>5} {'step s':>8} {'rows/s':>8} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for steps in args.steps:
        group = sample_groups(base.to("cuda") if device == "cuda" else base, 1, args.group_size, steps, seed=1)
        base.to("cpu")
        for reduction in (False, True):
            for checkpointing in (False, True):
                r = run_case(state, model_cfg, group, steps, reduction, checkpointing, args)
                results.append(r)
                print(f"{r['T']:>3} {r['reduction']:>9} {str(r['checkpointing']):>5} {r['rows']:>5} "
                      f"{r['micro_batches']:>5} {r['step_s']:>8.3f} {r['rows_per_s']:>8.1f} {r['peak_mb']:>8.1f}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
