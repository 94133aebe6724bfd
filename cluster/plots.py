"""Small PNG figures drawn with Pillow (no plotting library needed): the reward curve of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np


Series = Union[Sequence[float], tuple[Sequence[float], Sequence[float]]]


def line_plot_png(xs: Sequence[float], series: dict[str, Series], path: str | Path, title: str = "",
                  size: tuple[int, int] = (640, 360)) -> Path:
    """A line per series: values at `xs`, or an `(x, y)` pair of sequences of its own (drawn with markers)."""
    from PIL import Image, ImageDraw
    w, h = size
    left, right, top, bottom = 56, 16, 28, 36
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    own = {name: isinstance(v, tuple) for name, v in series.items()}
    series = {name: (v if own[name] else (xs, v)) for name, v in series.items()}
    all_x = [float(x) for sx, _ in series.values() for x in sx] or [float(x) for x in xs]
    ys = np.concatenate([np.asarray(v, dtype=float) for _, v in series.values()]) if series else np.zeros(1)
    ys = ys[np.isfinite(ys)] if np.isfinite(ys).any() else np.zeros(1)
    y0, y1 = float(ys.min()), float(ys.max())
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x0, x1 = (min(all_x), max(all_x)) if all_x else (0.0, 1.0)
    x1 = x1 if x1 > x0 else x0 + 1
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        d.line([left - 4, py(yv), left, py(yv)], fill="black")
        d.text((4, py(yv) - 6), f"{yv:.2f}", fill="black")
    for k in range(5):
        xv = x0 + (x1 - x0) * k / 4
        d.text((px(xv) - 8, h - bottom + 6), f"{xv:.0f}", fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]
    for i, (name, (sx, vals)) in enumerate(series.items()):
        pts = [(px(x), py(y)) for x, y in zip(sx, vals) if np.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colors[i % len(colors)], width=2)
        if own[name]:
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colors[i % len(colors)])
        d.text((left + 8, top + 4 + 14 * i), name, fill=colors[i % len(colors)])
    d.text((left, 8), title, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def reward_curve(output_dir: str | Path) -> Path:
    """reward_curve.png of a run: the per-step mean reward, its moving average and the held-out evaluations."""
    import json
    from .metrics import read_metrics
    records = read_metrics(output_dir)
    steps = [r["step"] for r in records]
    reward = [r["reward_mean"] if r["reward_mean"] is not None else float("nan") for r in records]
    k = max(1, len(reward) // 10)
    smooth = np.convolve(np.nan_to_num(reward), np.ones(k) / k, mode="valid").tolist()
    series: dict[str, Series] = {"reward_mean": reward,
                                 f"moving average ({k})": [float("nan")] * (k - 1) + smooth}
    evals = sorted(Path(output_dir).glob("eval/step_*.json"))
    if evals:   # the evaluation at step s scores the policy after s updates
        reports = [json.loads(p.read_text()) for p in evals]
        series["held-out GenEval overall"] = ([float(r.get("step", 0)) for r in reports],
                                              [float(r["overall"]) for r in reports])
    return line_plot_png(steps, series, Path(output_dir) / "reward_curve.png", title="training reward and held-out score")
