"""Image grids as PNG files (generation outputs, training samples, evaluation reports).

The tiling is `torchvision.utils.make_grid`; `captioned_grid` adds each row's prompt above the row (PIL
ImageDraw) and, for evaluations, a verdict per image: a green frame with a drawn check mark (correct) or a red
frame with a cross (wrong), or, for a reward without verdicts, each image's score, so a grid can be read without
its JSON report.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .files import atomic_write

WHITE = (255, 255, 255)
PASS_COLOR = (0, 160, 60)      # frame and check mark of a correct image
FAIL_COLOR = (220, 30, 30)     # frame and cross of a wrong image


def _as_uint8_nhwc(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    return t


def _upscale(t: torch.Tensor, scale: int) -> torch.Tensor:
    return t.repeat_interleave(scale, 1).repeat_interleave(scale, 2) if scale > 1 else t


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2,
               scale: int = 1) -> np.ndarray:
    """uint8 [B, H, W, 3] → one uint8 grid image [H', W', 3] (white padding), `nrow` images per row (default:
    a square-ish grid), nearest-neighbour upscaled by `scale`. The tiling is torchvision's `make_grid`."""
    from torchvision.utils import make_grid
    t = _upscale(_as_uint8_nhwc(images), scale)
    nrow = nrow or math.ceil(math.sqrt(t.shape[0]))
    grid = make_grid(t.permute(0, 3, 1, 2), nrow=nrow, padding=pad, pad_value=255)
    return grid.permute(1, 2, 0).contiguous().numpy()


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)    # scalable when Pillow has FreeType
    except TypeError:                               # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _draw_mark(draw, x: int, y: int, size: int, correct: bool) -> None:
    """A check mark or a cross in a white disc whose top-left corner is (x, y) (drawn, so no font glyph needed)."""
    color = PASS_COLOR if correct else FAIL_COLOR
    draw.ellipse([x, y, x + size, y + size], fill=WHITE, outline=color, width=max(1, size // 10))
    w = max(2, size // 6)
    s = size
    if correct:
        draw.line([(x + 0.22 * s, y + 0.52 * s), (x + 0.42 * s, y + 0.72 * s), (x + 0.78 * s, y + 0.30 * s)],
                  fill=color, width=w)
    else:
        draw.line([(x + 0.28 * s, y + 0.28 * s), (x + 0.72 * s, y + 0.72 * s)], fill=color, width=w)
        draw.line([(x + 0.72 * s, y + 0.28 * s), (x + 0.28 * s, y + 0.72 * s)], fill=color, width=w)


def captioned_grid(images: torch.Tensor | np.ndarray, captions: Sequence[str], nrow: int, *,
                   verdicts: Optional[Sequence[Optional[float]]] = None, scores: Optional[Sequence[float]] = None,
                   score_name: str = "score", scale: int = 1, pad: int = 6, font_size: int = 13) -> np.ndarray:
    """uint8 [B, H, W, 3] → a grid with `nrow` images per row and `captions[r]` written above row r.

    `verdicts` (one per image; truthy = correct, falsy = wrong, None = no verdict) frames each image in green or
    red (each image's half of the padding around it carries the frame) and draws a check mark or a cross in its corner; each
    caption then ends with "k/n correct" for its row.
    `scores` (one per image, e.g. a PickScore) writes each image's score on a white label in its top-left corner;
    each caption then ends with "<score_name> mean m" for its row.
    """
    from PIL import Image, ImageDraw
    t = _upscale(_as_uint8_nhwc(images), scale)
    b, h, w, _ = t.shape
    rows = math.ceil(b / nrow)
    if len(captions) != rows:
        raise ValueError(f"{len(captions)} captions for {rows} rows of {nrow} images ({b} images)")
    if verdicts is not None and len(verdicts) != b:
        raise ValueError(f"{len(verdicts)} verdicts for {b} images")
    if scores is not None and len(scores) != b:
        raise ValueError(f"{len(scores)} scores for {b} images")
    font = _font(font_size)
    width = nrow * (w + pad) + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    char_w = max(1.0, probe.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    line_h = font_size + 4
    texts = []
    for r, caption in enumerate(captions):
        text = str(caption)
        if verdicts is not None:
            row = [v for v in verdicts[r * nrow:(r + 1) * nrow] if v is not None]
            if row:
                text += f"  [{sum(bool(v) for v in row)}/{len(row)} correct]"
        if scores is not None:
            row = [float(v) for v in scores[r * nrow:(r + 1) * nrow]]
            if row:
                text += f"  [{score_name} mean {sum(row) / len(row):.4g}]"
        texts.append(textwrap.wrap(text, max(8, int((width - 2 * pad) / char_w))) or [""])
    heights = [len(lines) * line_h + pad for lines in texts]
    canvas = Image.new("RGB", (width, sum(heights) + rows * (h + pad) + pad), WHITE)
    draw = ImageDraw.Draw(canvas)
    y = 0
    mark = max(10, min(h, w) // 5)
    for r in range(rows):
        for k, line in enumerate(texts[r]):
            draw.text((pad, y + pad + k * line_h), line, fill=(0, 0, 0), font=font)
        y += heights[r]
        for c in range(nrow):
            i = r * nrow + c
            if i >= b:
                break
            x0, y0 = pad + c * (w + pad), y + pad
            v = verdicts[i] if verdicts is not None else None
            if v is not None:   # the frame: this image's half of the padding around it
                f = max(1, pad // 2)
                draw.rectangle([x0 - f, y0 - f, x0 + w + f - 1, y0 + h + f - 1], fill=PASS_COLOR if v else FAIL_COLOR)
            canvas.paste(Image.fromarray(t[i].numpy()), (x0, y0))
            if v is not None:
                _draw_mark(draw, x0 + w - mark - 2, y0 + 2, mark, bool(v))
            if scores is not None:
                label = f"{float(scores[i]):.4g}"
                tw = int(draw.textlength(label, font=font))
                draw.rectangle([x0, y0, x0 + tw + 4, y0 + font_size + 3], fill=WHITE)
                draw.text((x0 + 2, y0 + 1), label, fill=(0, 0, 0), font=font)
        y += h + pad
    return np.asarray(canvas)


def _save_png(array: np.ndarray, path: str | Path) -> Path:
    from PIL import Image
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """`image_grid` written atomically as a PNG."""
    return _save_png(image_grid(images, nrow=nrow, scale=scale), path)


def save_captioned_grid(images: torch.Tensor | np.ndarray, path: str | Path, captions: Sequence[str], nrow: int,
                        verdicts: Optional[Sequence[Optional[float]]] = None, scale: int = 1,
                        scores: Optional[Sequence[float]] = None, score_name: str = "score") -> Path:
    """`captioned_grid` written atomically as a PNG."""
    return _save_png(captioned_grid(images, captions, nrow, verdicts=verdicts, scores=scores, score_name=score_name,
                                    scale=scale), path)
