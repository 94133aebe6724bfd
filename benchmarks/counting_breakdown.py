"""Where a run's counting score comes from: each held-out counting prompt's accuracy, and the accuracy on the
training split's counting prompts (the prompts RL trained on), for the last checkpoint of each run given, and for
each counting prompt how many objects its images show (does the count follow the number word?).

    python -m benchmarks.counting_breakdown runs/rewards/exact_counts_g_16/seed0 [more run dirs] [--base]

The held-out evaluation uses the run's own config and seed, so it reproduces the run's own last evaluation image for
image (and its overall score); `--base` evaluates each run's starting policy (`policy.init`) instead. Reports go to
`<run>/counting_breakdown/`. docs/rewards.md has the table this printed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.config import load_config
from cluster.data import prompt_tag, train_prompts
from cluster.evaluate import evaluate_command
from learner import latest_checkpoint
from policy.files import atomic_write_text


def breakdown(run: Path, base: bool) -> dict:
    out = run / "counting_breakdown" / ("base" if base else "last")
    overrides = ["cluster.backend=local", "logging.progress=false"]
    cfg = load_config(str(run / "config.yaml"), overrides + [f"output_dir={out / 'heldout'}"])
    last = None if base else latest_checkpoint(run / "checkpoints")
    if not base and last is None:
        raise SystemExit(f"{run} has no complete checkpoint under checkpoints/: give a finished run's directory, or "
                         f"--base to evaluate its starting policy")
    checkpoint = None if base else str(last)
    heldout = evaluate_command(cfg, checkpoint)
    counting = [p for p in train_prompts(cfg) if prompt_tag(p) == "counting"]
    path = out / "train_counting.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({**p.metadata, "prompt": p.prompt}) + "\n" for p in counting))
    cfg = load_config(str(run / "config.yaml"), overrides + [f"output_dir={out / 'train'}"])
    train = evaluate_command(cfg, checkpoint, str(path))
    return {"run": str(run), "policy": "base" if base else checkpoint, "overall": heldout["overall"],
            "heldout_counting": {p["prompt"]: p["accuracy"] for p in heldout["prompts"] if p["tag"] == "counting"},
            "train_counting": train["categories"]["counting"],
            "objects": [("held-out", p) for p in heldout["prompts"] if p["tag"] == "counting"]
                       + [("training", p) for p in train["prompts"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (config.yaml + checkpoints/)")
    ap.add_argument("--base", action="store_true", help="evaluate each run's starting policy instead")
    args = ap.parse_args(argv)
    rows = [breakdown(run, args.base) for run in args.runs]
    print("\n| run | policy | held-out overall | held-out counting, per prompt | training counting prompts |")
    print("|---|---|---|---|---|")
    for r in rows:
        per = ", ".join(f"{p.removeprefix('a photo of ')} {a:.2f}" for p, a in r["heldout_counting"].items())
        print(f"| {r['run']} | {Path(r['policy']).name} | {r['overall']:.3f} | {per} | "
              f"{r['train_counting']:.3f} |")
    # does the policy's count follow the number word? the objects its images show, per counting prompt
    print("\n| run | policy | split | prompt | accuracy | images by objects detected |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for split, p in r["objects"]:
            drawn = ", ".join(f"{n}: {c}" for n, c in p.get("objects", {}).items())
            print(f"| {r['run']} | {Path(r['policy']).name} | {split} | {p['prompt'].removeprefix('a photo of ')} | "
                  f"{p['accuracy']:.2f} | {drawn} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
