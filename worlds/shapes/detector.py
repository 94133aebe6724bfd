"""Exact object detector of the shapes world.

Objects are patch-aligned: every patch (image token) that exactly equals a non-background codebook pattern is one
detection -- label = its shape, ``color`` = its colour, ``box`` = the tight pixel box of its mask
(``(x0, y0, x1, y1)``, x1/y1 exclusive, i.e. the patch box for the default shapes), ``score`` = 1.0.

Decisions for arbitrary images (e.g. decoded model samples):

* adjacent patches with the same shape and colour are *separate* objects (one per patch), so counting is the
  number of such patches -- exactly what the codebook and the renderer use;
* a patch that is not exactly a codebook pattern (never produced by ``decode``; only possible for foreign images)
  yields no detection, and neither does a background patch.

Everything is batched; the only Python loop runs over the detections themselves to build ``Detection`` objects.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from rewards.detectors import register_detector
from rewards.types import Detection
from worlds.shapes.codebook import ArrayLike, ShapesCodebook, _as_tensor
from worlds.shapes.world import WorldLike


class ShapesDetector:
    """Exact detector for a :class:`~worlds.shapes.world.ShapesWorld` (see the module docstring)."""

    def __init__(self, world: WorldLike = None, with_masks: bool = False, **world_kwargs: Any) -> None:
        self.codebook = ShapesCodebook(world, **world_kwargs)
        self.world = self.codebook.world
        self.with_masks = with_masks

    def detect(self, images: ArrayLike) -> list[list[Detection]]:
        """uint8 images ``[B, H, W, 3]`` -> per image, the list of its detections (row-major patch order)."""
        codes, exact = self.codebook.match(images)
        codes = torch.as_tensor(codes).cpu()
        codes = torch.where(torch.as_tensor(exact).cpu(), codes, torch.full_like(codes, -1))
        return self._from_codes(codes)

    def detect_codes(self, codes: ArrayLike) -> list[list[Detection]]:
        """Same as ``detect(decode(codes))`` without drawing the images: long codes ``[B, N]`` in ``[0, K)``."""
        c, _ = _as_tensor(codes)
        c = c.cpu().long()
        if c.ndim != 2 or c.shape[1] != self.world.num_tokens:
            raise ValueError(f"expected codes [B, {self.world.num_tokens}], got {tuple(c.shape)}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook.codebook_size})")
        return self._from_codes(c)

    __call__ = detect

    def _from_codes(self, codes: torch.Tensor) -> list[list[Detection]]:
        """codes long ``[B, N]`` (-1 = unrecognised patch) -> detections."""
        tok, w = self.codebook, self.world
        g, p = w.grid_size, w.patch_size
        b = codes.shape[0]
        obj = codes > 0
        img_idx, cell = torch.nonzero(obj, as_tuple=True)                  # row-major, grouped by image
        code = codes[img_idx, cell]
        origin = torch.stack([cell % g, cell // g], dim=1) * p                # (x, y) of the patch's top-left pixel
        boxes = (tok.code_box[code] + origin.repeat(1, 2)).tolist()
        labels = [w.shapes[s] for s in tok.shape_of_code[code].tolist()]
        colors = [w.colors[c] for c in tok.color_of_code[code].tolist()]
        out: list[list[Detection]] = [[] for _ in range(b)]
        masks = None
        if self.with_masks:
            masks = torch.zeros(len(code), g, p, g, p, dtype=torch.bool)
            masks[torch.arange(len(code)), cell // g, :, cell % g, :] = tok.code_mask[code]
            masks = masks.reshape(len(code), g * p, g * p).numpy()
        for k, i in enumerate(img_idx.tolist()):
            out[i].append(Detection(label=labels[k], score=1.0, box=tuple(float(v) for v in boxes[k]),
                                    mask=None if masks is None else masks[k], color=colors[k]))
        return out


def make_detector(with_masks: bool = False, **world_kwargs: Any) -> Callable[[ArrayLike], list[list[Detection]]]:
    """A picklable callable ``uint8 images [B, H, W, 3] -> list[list[Detection]]`` for ``ShapesWorld(**world_kwargs)``.

    Meant to be referenced by dotted path (``worlds.shapes.detector.make_detector``) in reward-actor configs.
    """
    return ShapesDetector(with_masks=with_masks, **world_kwargs).detect


def detect(images: ArrayLike, world: WorldLike = None) -> list[list[Detection]]:
    """One-shot :meth:`ShapesDetector.detect` (builds a detector; prefer :func:`make_detector` in loops)."""
    return ShapesDetector(world).detect(images)


def _register() -> None:
    """Make the detector buildable as ``build_detector({"name": "shapes", **world_kwargs})``."""
    register_detector("shapes")(ShapesDetector)


_register()
