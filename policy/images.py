"""Image grids as PNG files (generation outputs, training samples, evaluation reports)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2,
               scale: int = 1) -> np.ndarray:
    """uint8 [B, H, W, 3] → one uint8 grid image, `nrow` images per row, nearest-neighbour upscaled by `scale`."""
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {arr.dtype} {arr.shape}")
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, _ = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    Image.fromarray(image_grid(images, nrow=nrow, scale=scale)).save(tmp)
    tmp.replace(path)
    return path
