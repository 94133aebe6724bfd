"""Why stale updates stalled: Mask-GRPO on the default world through the product's training step on the local
backend (every role in this process, no Ray), with each batch launched `--staleness` steps before it is trained,
so the learning dynamics are seen without the distributed machinery.

    python -m benchmarks.stale_updates --staleness 1 algorithm.stale_logprobs=recorded      # the old behaviour
    python -m benchmarks.stale_updates --staleness 1                                      # the fix (recompute)
    python -m benchmarks.stale_updates --staleness 1 algorithm.stale_logprobs=recorded algorithm.clip_low=1e-6 \\
        algorithm.clip_high=1e6                                                             # no clip

It runs `cluster.driver.Trainer.train_step` (`cluster.backend=local`, `cluster.max_staleness=--staleness`) and
prints one JSON line: the training reward of the first and last 10 steps, the share of clipped rows, the largest
ratio and the minutes taken. Extra arguments are config overrides of configs/default.yaml. (The advantage
re-centring variant of docs/experiments.md was measured with this script's own step at commit 4dd8672; the
script now runs only the product's step. Those figures used the default run's G=8 of the time: add
`data.group_size=8` to reproduce them; the default run now samples 16 per prompt.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    from cluster.config import load_config
    from cluster.driver import Trainer
    from cluster.pretrain import ensure_base_policy
    from cluster.runtime import cpu_deepspeed_env

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--staleness", type=int, default=0, help="steps between sampling a batch and training on it")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--out", default="runs/stale_updates")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cpu_deepspeed_env()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"seed={args.seed}", f"max_steps={args.steps}", f"learner.total_steps={args.steps}",
                                    f"output_dir={args.out}/s{args.staleness}_seed{args.seed}", "cluster.backend=local",
                                    f"cluster.max_staleness={args.staleness}", "logging.progress=false",
                                    *args.overrides])
    ensure_base_policy(cfg)
    trainer = Trainer(cfg)
    out, t0 = [], time.time()
    try:
        trainer.sync_weights()
        for _ in range(args.steps):
            rec = trainer.train_step().to_json()
            out.append({"reward": rec["reward_mean"], "clip": rec["learner/clip_frac"],
                        "ratio_max": rec["learner/ratio_max"]})
    finally:
        trainer.shutdown()
    r = [o["reward"] for o in out]
    print(json.dumps({"staleness": args.staleness, "overrides": args.overrides, "seed": args.seed,
                      "steps": args.steps, "reward_first10": round(statistics.fmean(r[:10]), 3),
                      "reward_last10": round(statistics.fmean(r[-10:]), 3),
                      "clip_frac": round(statistics.fmean(o["clip"] for o in out), 4),
                      "ratio_max": round(max(o["ratio_max"] for o in out), 2),
                      "minutes": round((time.time() - t0) / 60, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
