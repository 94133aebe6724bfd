"""The efficiency frontier: held-out gain against compute for the recipes of configs/efficiency.yaml.

    python -m benchmarks.efficiency [--config configs/efficiency.yaml] [--seeds 0,1,2] [--only NAME] [--cached]
                                    [--root runs/efficiency] [--doc docs/efficiency.md]

Every (variant, seed) is a full training run (`benchmarks.ablations.run_or_load`: cached in
``<root>/<variant>/seed<k>/summary.json``, so an interrupted study continues). For each variant it prints and
writes to the doc: the held-out gain (overall after − before) as mean ± a 95 % t-interval over the seeds, the
compute of the run (`compute_tokens` summed over its steps: image-token positions of the rollouts plus three times
the learner's) and its share of the first variant's, the training steps' wall seconds and the CPU seconds of the
whole run; and a plot of gain against compute (``docs/efficiency.png``).
"""
from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from policy.files import atomic_write, atomic_write_text

from .ablations import run_or_load, slug

T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}   # df -> t


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval) of per-seed values (half-width NaN for one seed)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), T_95.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))


def summarise(name: str, runs: list[dict], seeds: list[int]) -> dict:
    gains = [r["eval_end"]["overall"] - r["eval_start"]["overall"] for r in runs]
    mean, half = interval(gains)
    return {"name": name, "seeds": len(runs), "seed_ids": seeds, "gain": mean, "gain_ci": half, "gains": gains,
            "before": float(np.mean([r["eval_start"]["overall"] for r in runs])),
            "after": float(np.mean([r["eval_end"]["overall"] for r in runs])),
            **{k: float(np.mean([r[k] for r in runs])) for k in ("compute_tokens", "rollout_tokens", "learner_tokens",
                                                                 "train_step_seconds", "cpu_seconds", "minutes")}}


def table(rows: list[dict]) -> str:
    ref = rows[0]
    lines = ["| recipe | seeds | held-out before → after | gain (95 % CI) | compute (M tokens) | share of default | "
             "rollout / learner (M) | train wall s | run CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f" ± {r['gain_ci']:.3f}" if math.isfinite(r["gain_ci"]) else ""
        lines.append(f"| {r['name']} | {','.join(map(str, r['seed_ids']))} | {r['before']:.3f} → {r['after']:.3f} | {r['gain']:+.3f}{ci} | "
                     f"{r['compute_tokens'] / 1e6:.2f} | {r['compute_tokens'] / ref['compute_tokens']:.0%} | "
                     f"{r['rollout_tokens'] / 1e6:.2f} / {r['learner_tokens'] / 1e6:.2f} | "
                     f"{r['train_step_seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(rows):
        err = r["gain_ci"] if math.isfinite(r["gain_ci"]) else 0.0
        ax.errorbar(r["compute_tokens"] / 1e6, r["gain"], yerr=err, marker="osD^v"[i // 10 % 5], capsize=4,
                    color=f"C{i % 10}", label=r["name"])     # colour and marker: distinct for up to 50 recipes
    ref = rows[0]
    ax.axhspan(ref["gain"] - (ref["gain_ci"] if math.isfinite(ref["gain_ci"]) else 0.0),
               ref["gain"] + (ref["gain_ci"] if math.isfinite(ref["gain_ci"]) else 0.0), color="C0", alpha=0.1,
               label=f"{ref['name']}: 95 % CI of its gain")
    ax.axvline(0.4 * ref["compute_tokens"] / 1e6, color="grey", linestyle="--", label="40 % of its compute")
    ax.set_xlabel("compute per run (M image-token positions: rollout + 3 × learner)")
    ax.set_ylabel("held-out gain (overall after − before)")
    ax.set_title("held-out gain against compute (mean ± 95 % CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/efficiency.yaml")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the file's)")
    ap.add_argument("--only", default=None, help="run only variants whose name contains this")
    ap.add_argument("--root", default="runs/efficiency")
    ap.add_argument("--cached", action="store_true",
                    help="run nothing: summarise the (variant, seed) runs already cached under --root")
    ap.add_argument("--doc", default="docs/efficiency.md", help="where the results go ('' for none)")
    args = ap.parse_args(argv)
    spec = OmegaConf.load(args.config)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(spec.seeds)
    rows = []
    for name, overrides in spec.variants.items():
        if args.only and args.only not in name:
            continue
        dirs = {seed: Path(args.root) / slug(name) / f"seed{seed}" for seed in seeds}
        if args.cached:
            dirs = {seed: d for seed, d in dirs.items() if (d / "summary.json").exists()}
            if not dirs:
                continue
        runs = [run_or_load(spec.base, list(spec.common) + list(overrides) + [f"seed={seed}"], d)
                for seed, d in dirs.items()]
        rows.append(summarise(name, runs, list(dirs)))
        print(table(rows), flush=True)
    if args.doc and rows:
        doc = Path(args.doc)
        png = plot(rows, doc.with_suffix(".png"))
        commands = (f"python -m benchmarks.efficiency --config {args.config} --seeds {','.join(map(str, seeds))}"
                    + (" --cached" if args.cached else ""))
        atomic_write_text(doc.with_name(doc.stem + "_table.md"),
                          f"<!-- written by `{commands}` on {platform.machine()} ({platform.node()}) -->\n\n"
                          + table(rows) + f"\n\n![gain against compute]({png.name})\n")
        print(f"wrote {doc.with_name(doc.stem + '_table.md')} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
