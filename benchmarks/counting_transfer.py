"""Does RL on counting transfer to (number, shape) pairs it never trained? Held-out counting on the untrained pairs,
beside a control of the trained pairs, before and after RL, per number word.

    python -m benchmarks.counting_transfer runs/world2_s0 [more run dirs] [--samples N]

For each run directory (config.yaml, base, checkpoints/) it evaluates the base (`policy.init` of the run's
config.yaml: step 0) and the last complete checkpoint, with the run's own evaluation protocol (`maskgrpo eval
--checkpoint ... --prompts FILE`: the run's seed, sampler, evaluation rewards and samples per prompt), on two prompt
files written as GenEval metadata (`<run>/counting_transfer/`):

* `heldout.jsonl`: the run's whole held-out split, in its order, so every prompt gets the evaluation seeds it had
  in the run's own evaluations (the overall score reproduces the run's eval/step_*.json); the **untrained pairs**
  are its counting prompts whose (number, shape) pair no training prompt shows;
* `trained_counting.jsonl`: the training prompts' counting prompts, the **trained pairs** (the control).

It prints accuracy (GenEval's strict verdicts) before -> after for untrained and trained pairs, per number word and
in all, per run and, for several runs, their mean; then each counting prompt with the images by objects detected.
`--samples N` evaluates N images per prompt instead of the run's number (the first ones are the run's: an image's
seed depends only on its prompt's position and its index); `--counting-only` writes only the held-out counting
prompts to `heldout.jsonl` (cheap with many samples; their images are then others than the run's own evaluation's,
and there is no overall score). Each run's figures go to `<run>/counting_transfer[_nN][_counting]/summary.json`. The configs' world section decides which pairs are untrained: with the
three-shape world's stratified split, "two" and "four" are trained with two shapes each; with
`world.split: count_transfer` every number word is trained with three (docs/rewards.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import numpy as np

from policy.files import atomic_write_json
from rewards.types import GenEvalItem
from worlds.shapes.world import NUMBER_WORDS, write_jsonl

POLICIES = ("base", "last")
PROMPT_FILES = {"heldout": "heldout.jsonl", "trained": "trained_counting.jsonl"}


def counting_pair(item: GenEvalItem) -> tuple[int, str]:
    """(number, shape) of a counting prompt: its first include clause."""
    clause = item.include[0]
    return int(clause["count"]), str(clause["class"])


def _items(prompts) -> list[GenEvalItem]:
    return [GenEvalItem.from_json({**p.metadata, "prompt": p.prompt}) for p in prompts]


def _config(run: Path, out: Path, samples: Optional[int]):
    from cluster.config import load_config
    overrides = ["cluster.backend=local", "logging.progress=false", f"output_dir={out}"]
    if samples:
        overrides.append(f"eval.samples_per_prompt={samples}")
    return load_config(str(run / "config.yaml"), overrides)


def policies(run: Path, cfg) -> dict[str, Optional[str]]:
    """The run's base and its last complete checkpoint, as `--checkpoint` values: the base is the run's config's
    `policy.init` (None: evaluated as the config says, e.g. the pretrained base's path the run recorded, or
    `random` with its init_seed; the cached base when the config still says "pretrained")."""
    from cluster.pretrain import base_dir
    from learner import latest_checkpoint
    base = str(base_dir(cfg)) if cfg.policy.init == "pretrained" else None
    last = latest_checkpoint(run / "checkpoints")
    if last is None:
        raise SystemExit(f"{run} has no complete checkpoint under checkpoints/: give a finished run's directory")
    return {"base": base, "last": str(last)}


def transfer(run: Path, samples: Optional[int] = None, counting_only: bool = False) -> dict[str, Any]:
    """Evaluate the run's base and last checkpoint on its held-out split (only its counting prompts with
    `counting_only`) and its trained counting prompts."""
    from cluster.data import eval_prompts, prompt_tag, train_prompts
    from cluster.evaluate import evaluate_command
    root = run / ("counting_transfer" + (f"_n{samples}" if samples else "") + ("_counting" if counting_only else ""))
    cfg = _config(run, root, samples)
    heldout = _items(eval_prompts(cfg))
    if counting_only:
        heldout = [it for it in heldout if it.tag == "counting"]
    trained = _items(p for p in train_prompts(cfg) if prompt_tag(p) == "counting")
    trained_pairs = {counting_pair(it) for it in trained}
    untrained = [it.prompt for it in heldout if it.tag == "counting" and counting_pair(it) not in trained_pairs]
    files = {"heldout": root / PROMPT_FILES["heldout"], "trained": root / PROMPT_FILES["trained"]}
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(heldout, files["heldout"])
    write_jsonl(trained, files["trained"])
    pair_of = {it.prompt: counting_pair(it) for it in heldout + trained if it.tag == "counting"}
    result: dict[str, Any] = {"run": str(run), "policies": policies(run, cfg), "base_init": str(cfg.policy.init),
                              "untrained": untrained,
                              "trained": [it.prompt for it in trained], "samples_per_prompt": cfg.eval.samples_per_prompt,
                              "prompts": {}, "overall": {}}
    for policy, checkpoint in result["policies"].items():
        for which, path in files.items():
            cfg = _config(run, root / policy / which, samples)
            report = evaluate_command(cfg, checkpoint, str(path))
            if which == "heldout" and not counting_only:
                result["overall"][policy] = report["overall"]
            for p in report["prompts"]:
                if p["tag"] != "counting" or (which == "heldout" and p["prompt"] not in untrained):
                    continue
                number, shape = pair_of[p["prompt"]]
                entry = result["prompts"].setdefault(p["prompt"], {"split": "untrained" if which == "heldout"
                                                                   else "trained", "number": number, "shape": shape})
                entry[policy] = {"accuracy": p["accuracy"], "objects": p.get("objects", {})}
    result["table"] = table_rows(result)
    atomic_write_json(root / "summary.json", result)
    return result


def table_rows(result: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """{number word or "all": {"untrained"/"trained": {"base", "last", "prompts"}}}: the mean accuracy of the
    prompts of each kind (each prompt has the same number of images)."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    numbers = sorted({e["number"] for e in result["prompts"].values()})
    for key in [NUMBER_WORDS.get(n, str(n)) for n in numbers] + ["all"]:
        rows[key] = {}
        for split in ("untrained", "trained"):
            entries = [e for e in result["prompts"].values() if e["split"] == split
                       and (key == "all" or NUMBER_WORDS.get(e["number"], str(e["number"])) == key)]
            if entries:
                rows[key][split] = {"prompts": len(entries),
                                    **{pol: float(np.mean([e[pol]["accuracy"] for e in entries])) for pol in POLICIES}}
    return rows


def _cell(cell: Optional[dict[str, float]]) -> str:
    if not cell:
        return "-"
    return f"{cell['base']:.3f} -> {cell['last']:.3f} ({cell['prompts']})"


def format_tables(results: list[dict[str, Any]]) -> str:
    lines = ["| run | number word | untrained pairs: before -> after (prompts) | trained pairs (control) | "
             "held-out overall |", "|---|---|---|---|---|"]
    for r in results:
        overall = f"{r['overall']['base']:.3f} -> {r['overall']['last']:.3f}" if r["overall"] else "-"
        for key, row in r["table"].items():
            lines.append(f"| {r['run']} | {key} | {_cell(row.get('untrained'))} | {_cell(row.get('trained'))} | "
                         f"{overall if key == 'all' else ''} |")
    if len(results) > 1:
        keys = list(dict.fromkeys(k for r in results for k in r["table"]))
        for key in keys:
            cells = []
            for split in ("untrained", "trained"):
                got = [r["table"][key][split] for r in results if split in r["table"].get(key, {})]
                cells.append(" -> ".join(f"{np.mean([g[p] for g in got]):.3f}" for p in POLICIES) if got else "-")
            overall = (" -> ".join(f"{np.mean([r['overall'][p] for r in results]):.3f}" for p in POLICIES)
                       if all(r["overall"] for r in results) else "-")
            lines.append(f"| mean of {len(results)} | {key} | {cells[0]} | {cells[1]} | "
                         f"{overall if key == 'all' else ''} |")
    lines += ["", "| run | split | prompt | before | after | images by objects detected, before / after |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for prompt, e in sorted(r["prompts"].items(), key=lambda kv: (kv[1]["split"] != "untrained",
                                                                        kv[1]["number"], kv[1]["shape"])):
            drawn = " / ".join(", ".join(f"{n}: {c}" for n, c in e[p]["objects"].items()) for p in POLICIES)
            lines.append(f"| {r['run']} | {e['split']} | {prompt.removeprefix('a photo of ')} | "
                         f"{e['base']['accuracy']:.2f} | {e['last']['accuracy']:.2f} | {drawn} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories (config.yaml + checkpoints/)")
    ap.add_argument("--samples", type=int, default=None,
                    help="images per prompt (default: the run's eval.samples_per_prompt)")
    ap.add_argument("--counting-only", action="store_true",
                    help="of the held-out split, evaluate only its counting prompts (no overall score; other seeds "
                         "than the run's own evaluation, which numbers images by the prompt's position)")
    args = ap.parse_args(argv)
    results = [transfer(run, args.samples, args.counting_only) for run in args.runs]
    print("\nheld-out counting on (number, shape) pairs never trained, and the trained pairs (control); accuracy "
          "before (base) -> after (last checkpoint), strict GenEval verdicts\n")
    print(format_tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
