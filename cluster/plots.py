"""Figures of a run, drawn with matplotlib (Agg, no display needed).

``reward_curve.png``: top, the training reward per step (mean, ± the within-step std as a band, and a moving
average) with the held-out GenEval overall score at each evaluation; bottom, the held-out accuracy of every
GenEval category over the evaluation steps. `reward_curve_data` returns the plotted series, so tests and scripts
can check what the figure shows without reading pixels.
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
    window ``window``; ``eval_steps``, ``eval_overall`` and ``eval_categories`` ({category: accuracies at
    eval_steps}, NaN where a report lacks the category), evaluations sorted by step.
    """
    records = read_metrics(output_dir)
    steps = np.array([r["step"] for r in records], dtype=float)
    mean = np.array([_float(r.get("reward_mean")) for r in records], dtype=float)
    std = np.array([_float(r.get("reward_std")) for r in records], dtype=float)
    window = max(1, len(mean) // 10)
    reports = [json.loads(p.read_text()) for p in Path(output_dir).glob("eval/step_*.json")]
    reports.sort(key=lambda r: r.get("step", 0))
    names = sorted({c for r in reports for c in r.get("categories", {})},
                   key=lambda c: (GENEVAL_TAGS.index(c) if c in GENEVAL_TAGS else len(GENEVAL_TAGS), c))
    return {"steps": steps, "reward_mean": mean, "reward_std": std, "window": window,
            "moving_average": moving_average(mean, window),
            # the evaluation at step s scores the policy after s updates
            "eval_steps": np.array([float(r.get("step", 0)) for r in reports]),
            "eval_overall": np.array([_float(r.get("overall")) for r in reports]),
            "eval_categories": {c: np.array([_float(r.get("categories", {}).get(c)) for r in reports])
                                for c in names}}


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
    if len(data["eval_steps"]):
        top.plot(data["eval_steps"], data["eval_overall"], color="C2", marker="o", linewidth=2,
                 label="held-out GenEval overall")
    top.set_ylabel("reward / accuracy")
    top.set_title("training reward and held-out score")
    top.grid(alpha=0.3)
    top.legend(loc="best", fontsize="small")
    for i, (name, values) in enumerate(data["eval_categories"].items()):
        bottom.plot(data["eval_steps"], values, marker="o", color=f"C{(i + 3) % 10}", label=name)
    if len(data["eval_steps"]):
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
