"""Small PNG figures drawn with Pillow (no plotting library needed): the reward curve of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def line_plot_png(xs: Sequence[float], series: dict[str, Sequence[float]], path: str | Path, title: str = "",
                  size: tuple[int, int] = (640, 360)) -> Path:
    from PIL import Image, ImageDraw
    w, h = size
    left, right, top, bottom = 56, 16, 28, 36
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    ys = np.concatenate([np.asarray(v, dtype=float) for v in series.values()]) if series else np.zeros(1)
    ys = ys[np.isfinite(ys)] if np.isfinite(ys).any() else np.zeros(1)
    y0, y1 = float(ys.min()), float(ys.max())
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x0, x1 = (float(min(xs)), float(max(xs))) if len(xs) else (0.0, 1.0)
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
    for i, (name, vals) in enumerate(series.items()):
        pts = [(px(x), py(y)) for x, y in zip(xs, vals) if np.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colors[i % len(colors)], width=2)
        d.text((left + 8, top + 4 + 14 * i), name, fill=colors[i % len(colors)])
    d.text((left, 8), title, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def reward_curve(output_dir: str | Path) -> Path:
    """reward_curve.png of a run: the per-step mean reward and its moving average."""
    from .metrics import read_metrics
    records = read_metrics(output_dir)
    steps = [r["step"] for r in records]
    reward = [r["reward_mean"] if r["reward_mean"] is not None else float("nan") for r in records]
    k = max(1, len(reward) // 10)
    smooth = np.convolve(np.nan_to_num(reward), np.ones(k) / k, mode="valid").tolist()
    series = {"reward_mean": reward, f"moving average ({k})": [float("nan")] * (k - 1) + smooth}
    return line_plot_png(steps, series, Path(output_dir) / "reward_curve.png", title="training reward")
