"""Runs the ablations of configs/ablations.yaml with several seeds and prints a table like the paper's.

    python -m benchmarks.ablations [--config configs/ablations.yaml] [--seeds 0,1] [--max-steps N] [--only NAME]

Each (variant, seed) is a full local training run (`runs/ablations/<variant>/seed<k>`); the table shows the
held-out GenEval-shapes overall score before and after RL (mean ± std over seeds) and the per-category gains.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from policy.files import atomic_write_json


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_or_load(base: str, overrides: list[str], out: Path) -> dict:
    """One training run of `base` with `overrides` into `out`, summarised in ``out/summary.json`` (read back when it
    exists, so an interrupted study continues where it stopped): the evaluations before and after, each role's
    busy share, the wall minutes and CPU seconds of the whole run (this process and its children), the training
    reward's first and last 10 steps, and the run's compute (``metrics.jsonl``'s token counters summed)."""
    import resource
    from cluster.config import load_config
    from cluster.metrics import read_metrics
    from cluster.train import train
    summary_path = out / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    cfg = load_config(base, list(overrides) + [f"output_dir={out}"])

    def cpu() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))
    t0, c0 = time.perf_counter(), cpu()
    result = train(cfg)
    summary = {k: result[k] for k in ("eval_start", "eval_end", "busy_share")}
    summary["minutes"] = (time.perf_counter() - t0) / 60
    summary["cpu_seconds"] = cpu() - c0
    records = read_metrics(out)
    rewards = [r["reward_mean"] for r in records]
    summary["train_reward_first10"] = float(np.mean(rewards[:10]))
    summary["train_reward_last10"] = float(np.mean(rewards[-10:]))
    summary["train_step_seconds"] = float(sum(r.get("step_seconds", 0.0) for r in records))
    for key in ("rollout_tokens", "learner_tokens", "compute_tokens"):
        summary[key] = float(sum(r.get(key, 0.0) for r in records))
    atomic_write_json(summary_path, summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ablations.yaml")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the file's)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--only", default=None, help="run only variants whose name contains this")
    ap.add_argument("--root", default="runs/ablations")
    args = ap.parse_args(argv)
    spec = OmegaConf.load(args.config)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(spec.seeds)
    rows = []
    for name, overrides in spec.variants.items():
        if args.only and args.only not in name:
            continue
        before, after, extras = [], [], []
        for seed in seeds:
            out = Path(args.root) / slug(name) / f"seed{seed}"
            extra = list(spec.common) + list(overrides) + [f"seed={seed}"]
            if args.max_steps:   # a shorter run with a complete learning-rate schedule
                extra += [f"max_steps={args.max_steps}", f"learner.total_steps={args.max_steps}"]
            summary = run_or_load(spec.base, extra, out)
            before.append(summary["eval_start"])
            after.append(summary["eval_end"])
            extras.append(summary)
        rows.append((name, before, after, extras))
        _print(rows, seeds)
    return 0


def _print(rows, seeds) -> None:
    cats = list(rows[0][2][0]["categories"])
    print(f"\n# held-out GenEval-shapes, {len(seeds)} seed(s) {seeds}; mean ± std over seeds")
    print("| variant | before | after | gain | train reward (first → last 10 steps) | minutes | "
          + " | ".join(cats) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(cats))
    for name, before, after, extras in rows:
        b = np.array([r["overall"] for r in before])
        a = np.array([r["overall"] for r in after])
        per_cat = [np.mean([r["categories"][c] for r in after]) for c in cats]
        r0 = np.mean([e.get("train_reward_first10", np.nan) for e in extras])
        r1 = np.mean([e.get("train_reward_last10", np.nan) for e in extras])
        minutes = np.mean([e.get("minutes", np.nan) for e in extras])
        print(f"| {name} | {b.mean():.3f} ± {b.std():.3f} | {a.mean():.3f} ± {a.std():.3f} | "
              f"{(a - b).mean():+.3f} | {r0:.2f} → {r1:.2f} | {minutes:.1f} | "
              + " | ".join(f"{v:.2f}" for v in per_cat) + " |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
