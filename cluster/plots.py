"""Figures of a run, drawn with matplotlib (Agg, no display needed).

``reward_curve.png``: top, the training reward per step (mean, ± the within-step std as a band, and a moving
average) with the held-out GenEval overall score at each evaluation; bottom, the held-out accuracy of every
GenEval category over the evaluation steps. Without GenEval verdicts (e.g. a PickScore run) the top shows each
held-out metric's mean with its 95 % interval, the bottom the first metric's mean per prompt group.
`reward_curve_data` returns the plotted series, so tests and scripts can check what the figure shows without
reading pixels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from policy.files import atomic_write
from rewards.types import GENEVAL_TAGS

from .metrics import read_metrics


def moving_average(values: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over the last `k` finite values (NaN where the window holds none); same length as `values`."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(len(v)) + 1
    lo = np.maximum(idx - k, 0)
    n = counts[idx] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[idx] - sums[lo]) / np.maximum(n, 1), np.nan)


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def reward_curve_data(output_dir: str | Path) -> dict[str, Any]:
    """The series `reward_curve` plots, from ``metrics.jsonl`` and ``eval/step_*.json``:

    ``steps``, ``reward_mean``, ``reward_std`` (per training step; NaN where missing), ``moving_average`` and its
    window ``window``; ``compute``: the run's compute up to the end of each step (cumulative ``compute_tokens``,
    image-token positions; empty for runs that did not count it); ``eval_steps``, ``eval_overall`` and ``eval_categories`` ({category: accuracies at
    eval_steps}, NaN where a report lacks the category), evaluations sorted by step; ``eval_metrics`` ({metric:
    {"mean", "lo", "hi"} at eval_steps}: the metrics of rewards without verdicts), and ``eval_groups`` ({group:
    means at eval_steps} of the first of them, ``eval_primary``).
    """
    records = read_metrics(output_dir)
    steps = np.array([r["step"] for r in records], dtype=float)
    mean = np.array([_float(r.get("reward_mean")) for r in records], dtype=float)
    std = np.array([_float(r.get("reward_std")) for r in records], dtype=float)
    window = max(1, len(mean) // 10)
    tokens = [r.get("compute_tokens") for r in records]
    compute = np.cumsum([float(t) for t in tokens]) if tokens and all(t is not None for t in tokens) else np.array([])
    reports = [json.loads(p.read_text()) for p in Path(output_dir).glob("eval/step_*.json")]
    reports.sort(key=lambda r: r.get("step", 0))
    names = sorted({c for r in reports for c in r.get("categories", {})},
                   key=lambda c: (GENEVAL_TAGS.index(c) if c in GENEVAL_TAGS else len(GENEVAL_TAGS), c))
    return {"steps": steps, "reward_mean": mean, "reward_std": std, "window": window, "compute": compute,
            "moving_average": moving_average(mean, window),
            # the evaluation at step s scores the policy after s updates
            "eval_steps": np.array([float(r.get("step", 0)) for r in reports]),
            "eval_overall": np.array([_float(r.get("overall")) for r in reports]),
            "eval_categories": {c: np.array([_float(r.get("categories", {}).get(c)) for r in reports])
                                for c in names},
            **_metric_series(reports)}


def _metric_series(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The held-out metrics of rewards without verdicts (a GenEval reward's own are its overall and categories)."""
    owners = {m.get("reward") for r in reports for m in r.get("metrics", {}).values() if m.get("verdicts")}
    names = list(dict.fromkeys(n for r in reports for n, m in r.get("metrics", {}).items()
                               if m.get("reward") not in owners))

    def series(name: str, key: str, index: int | None = None) -> np.ndarray:
        out = []
        for r in reports:
            m = r.get("metrics", {}).get(name) or {}
            v = m.get(key)
            out.append(_float(v if index is None or v is None else v[index]))
        return np.array(out)
    metrics = {n: {"mean": series(n, "mean"), "lo": series(n, "ci95", 0), "hi": series(n, "ci95", 1)} for n in names}
    primary = names[0] if names else None
    groups = list(dict.fromkeys(g for r in reports for g in r.get("metrics", {}).get(primary, {}).get("groups", {})))
    return {"eval_metrics": metrics, "eval_primary": primary,
            "eval_groups": {g: np.array([_float(r.get("metrics", {}).get(primary, {}).get("groups", {}).get(g, {})
                                               .get("mean")) for r in reports]) for g in groups}}


def reward_curve_figure(data: dict[str, Any]):
    """A matplotlib Figure (Agg canvas) of `reward_curve_data`: two axes sharing the step axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    steps, mean, std = data["steps"], data["reward_mean"], data["reward_std"]
    if len(steps):
        band = np.isfinite(mean) & np.isfinite(std)
        top.fill_between(steps, np.where(band, mean - std, np.nan), np.where(band, mean + std, np.nan),
                         color="C0", alpha=0.15, linewidth=0, label="± std within the step")
    top.plot(steps, mean, color="C0", linewidth=1, label="training reward (mean)")
    top.plot(steps, data["moving_average"], color="C1", linewidth=2,
             label=f"moving average ({data['window']} steps)")
    verdicts = bool(np.isfinite(data["eval_overall"]).any()) if len(data["eval_steps"]) else False
    if verdicts:
        top.plot(data["eval_steps"], data["eval_overall"], color="C2", marker="o", linewidth=2,
                 label="held-out GenEval overall")
    for i, (name, m) in enumerate(data.get("eval_metrics", {}).items()):
        x, y = data["eval_steps"], m["mean"]
        ok = np.isfinite(m["lo"]) & np.isfinite(m["hi"])
        err = np.where(ok, np.stack([y - m["lo"], m["hi"] - y]), 0.0)
        top.errorbar(x, y, yerr=err, color=f"C{(i + 2) % 10}" if not verdicts else f"C{(i + 5) % 10}", marker="o",
                     linewidth=2, capsize=4, label=f"held-out {name} (95 % interval)")
    top.set_ylabel("reward / accuracy" if verdicts or not data.get("eval_metrics") else "reward / held-out score")
    top.set_title("training reward and held-out score")
    compute = data.get("compute", np.array([]))
    if len(compute) == len(steps) and len(steps) > 1 and bool(np.all(np.diff(compute) > 0)):
        # the same curves against compute: step s ends after compute[s] image-token positions
        to_compute = lambda s: np.interp(s, steps, compute)                          # noqa: E731
        to_step = lambda c: np.interp(c, compute, steps)                             # noqa: E731
        axis = top.secondary_xaxis("top", functions=(to_compute, to_step))
        axis.set_xlabel("compute (image-token positions: rollout + 3 × learner)")
    top.grid(alpha=0.3)
    top.legend(loc="best", fontsize="small")
    if not verdicts and data.get("eval_primary") and len(data["eval_steps"]):
        primary = data["eval_primary"]
        for i, (name, values) in enumerate(data["eval_groups"].items()):
            bottom.plot(data["eval_steps"], values, marker="o", color=f"C{(i + 3) % 10}", label=name)
        bottom.plot(data["eval_steps"], data["eval_metrics"][primary]["mean"], color="C2", linestyle="--",
                    label="all prompts")
        bottom.legend(loc="best", fontsize="small", ncol=2)
        bottom.set_xlabel("training step")
        bottom.set_ylabel(f"held-out {primary} (mean)")
        bottom.set_title(f"held-out {primary} per prompt group")
        bottom.grid(alpha=0.3)
        return fig
    for i, (name, values) in enumerate(data["eval_categories"].items()):
        bottom.plot(data["eval_steps"], values, marker="o", color=f"C{(i + 3) % 10}", label=name)
    if verdicts:
        bottom.plot(data["eval_steps"], data["eval_overall"], color="C2", linestyle="--", label="overall")
        bottom.legend(loc="best", fontsize="small", ncol=2)
    else:
        bottom.text(0.5, 0.5, "no held-out evaluation yet", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("training step")
    bottom.set_ylabel("held-out accuracy")
    bottom.set_title("held-out GenEval categories")
    bottom.grid(alpha=0.3)
    return fig


def reward_curve(output_dir: str | Path) -> Path:
    """Write ``<output_dir>/reward_curve.png`` (see the module docstring) and return its path."""
    path = Path(output_dir) / "reward_curve.png"
    fig = reward_curve_figure(reward_curve_data(output_dir))
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
