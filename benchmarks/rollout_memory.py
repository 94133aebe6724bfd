"""Peak memory of one group's rollout per sample, measured, against the preflight's estimate from below
(`cluster.preflight.rollout_bytes_per_sample`), which refuses group sizes a local machine cannot hold.

    python -m benchmarks.rollout_memory --config configs/tiny.yaml --group-size 8000

Each measurement runs in a fresh process (peak RSS only grows), on the CPU, one thread.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Optional, Sequence


def _measure(config: str, group_size: int) -> float:
    """Peak RSS added by sampling one group of `group_size` with the config's policy and sampler, per sample."""
    import resource
    import torch
    from cluster.config import load_config, section
    from policy.factory import build_model
    from policy.sampler import UnmaskingSampler
    torch.set_num_threads(1)
    cfg = load_config(config)
    model = build_model(section(cfg, "policy")).eval()     # its weights do not change the memory
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = UnmaskingSampler(model, section(cfg, "sampler"))
    with torch.no_grad():
        sampler.sample(model.padding_condition(), list(range(group_size)), group_size,
                       null_condition=model.padding_condition())
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / group_size


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--group-size", type=int, nargs="+", default=[2000, 8000])
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # the child process
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(_measure(args.config, args.one)))
        return 0
    from cluster.config import load_config
    from cluster.preflight import rollout_bytes_per_sample
    estimate = rollout_bytes_per_sample(load_config(args.config))
    print(f"{'group size':>10} {'measured MiB/sample':>20} {'estimate MiB/sample':>20}")
    for g in args.group_size:
        out = subprocess.run([sys.executable, "-m", "benchmarks.rollout_memory", "--config", args.config,
                              "--one", str(g)], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{g:>10} {measured / 2**20:>20.3f} {estimate / 2**20:>20.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
