"""The shapes world's exact image codebook (its patch tokenizer).

Codebook (``K = 1 + n_shapes * n_colors`` codes, 13 by default)::

    code 0                          background patch (every pixel = ``world.background``)
    code 1 + s * n_colors + c       shape ``world.shapes[s]`` drawn in colour ``world.colors[c]`` on the background

An image of ``grid_size x grid_size`` patches is the row-major sequence of its patches' codes (``N = grid_size ** 2``
tokens).  ``decode`` maps every code in ``[0, K)`` to a valid image; ``encode`` inverts it exactly on any image made
of codebook patches (in particular on everything ``decode`` and :mod:`worlds.shapes.render` produce).

All functions are batched (tensor ops / table look-ups, no per-image Python loops) and accept a ``torch.Tensor`` or
a ``numpy.ndarray``; the result has the same kind as the input.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import numpy as np
import torch

from worlds.shapes.world import COLOR_RGB, ShapesWorld, WorldLike, as_world, shape_mask

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_tensor(x: ArrayLike) -> tuple[torch.Tensor, bool]:
    """``(tensor, was_numpy)``; numpy arrays are wrapped without copying where possible."""
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        return torch.from_numpy(x if x.flags.writeable else x.copy()), True
    if isinstance(x, torch.Tensor):
        return x, False
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


class ShapesCodebook:
    """Exact image codebook for a :class:`ShapesWorld` (see the module docstring for the code layout)."""

    BACKGROUND: int = 0

    def __init__(self, world: WorldLike = None, **world_kwargs: Any) -> None:
        self.world: ShapesWorld = as_world(world, **world_kwargs)
        w = self.world
        p, n_s, n_c = w.patch_size, len(w.shapes), len(w.colors)
        k = 1 + n_s * n_c
        bg = torch.tensor(w.background, dtype=torch.uint8)
        book = bg.expand(k, p, p, 3).clone()
        masks = torch.stack([torch.from_numpy(shape_mask(s, p)) for s in w.shapes])          # [S, p, p]
        shape_of = torch.full((k,), -1, dtype=torch.long)
        color_of = torch.full((k,), -1, dtype=torch.long)
        for s in range(n_s):
            for c in range(n_c):
                code = 1 + s * n_c + c
                book[code][masks[s]] = torch.tensor(COLOR_RGB[w.colors[c]], dtype=torch.uint8)
                shape_of[code], color_of[code] = s, c
        # tight box of each code's foreground inside its patch: (x0, y0, x1, y1), x1/y1 exclusive; zeros for code 0
        box = torch.zeros(k, 4, dtype=torch.long)
        for code in range(1, k):
            m = masks[shape_of[code]]
            ys, xs = torch.nonzero(m, as_tuple=True)
            box[code] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        self.codebook: torch.Tensor = book                       # uint8 [K, p, p, 3]
        self.shape_of_code: torch.Tensor = shape_of              # long [K], -1 for background
        self.color_of_code: torch.Tensor = color_of              # long [K], -1 for background
        self.code_box: torch.Tensor = box                        # long [K, 4] patch-local foreground box
        self.code_mask: torch.Tensor = torch.cat([torch.zeros(1, p, p, dtype=torch.bool),
                                                  masks.repeat_interleave(n_c, dim=0)])  # bool [K, p, p]
        flat = book.reshape(k, -1).to(torch.float64)
        self._flat_book = flat                                   # float64 [K, p*p*3]
        self._book_sq = (flat * flat).sum(1)                     # float64 [K]

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def codebook_size(self) -> int:
        """Number of codes ``K``."""
        return int(self.codebook.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens per image ``N``."""
        return self.world.num_tokens

    def code_for(self, shape: str, color: str) -> int:
        """The code of ``shape`` drawn in ``color``."""
        return 1 + self.world.shapes.index(shape) * len(self.world.colors) + self.world.colors.index(color)

    # --------------------------------------------------------------------------------------------------- codecs
    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> ``[B, N, p*p*3]`` row-major patches."""
        w = self.world
        g, p = w.grid_size, w.patch_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (w.image_size, w.image_size, 3):
            raise ValueError(f"expected images [B, {w.image_size}, {w.image_size}, 3], got {tuple(images.shape)}")
        b = images.shape[0]
        return images.reshape(b, g, p, g, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)

    def match(self, images: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
        """Nearest code of every patch and whether it matches exactly: ``(long [B, N], bool [B, N])``.

        Distances are squared L2 over the patch's pixels, computed exactly (integers in float64).
        """
        x, was_np = _as_tensor(images)
        if x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {x.dtype}")
        patches = self._patches(x.cpu()).to(torch.float64)                              # [B, N, D]
        d2 = (patches * patches).sum(-1, keepdim=True) + self._book_sq - 2.0 * patches @ self._flat_book.T
        best, codes = d2.min(-1)
        exact = best == 0
        if was_np:
            return codes.numpy(), exact.numpy()
        return codes.to(x.device), exact.to(x.device)

    def encode(self, images: ArrayLike, strict: bool = True) -> ArrayLike:
        """uint8 images ``[B, H, W, 3]`` -> long codes ``[B, N]`` (row-major patches).

        With ``strict`` (default) every patch must be a codebook patch (else ``ValueError``); otherwise patches are
        mapped to the nearest code.
        """
        codes, exact = self.match(images)
        if strict and not bool(exact.all()):
            n_bad = int((~torch.as_tensor(exact)).sum())
            raise ValueError(f"{n_bad} patches are not codebook patches (use strict=False for nearest codes)")
        return codes

    def decode(self, codes: ArrayLike) -> ArrayLike:
        """long codes ``[B, N]`` in ``[0, K)`` -> uint8 images ``[B, H, W, 3]``."""
        c, was_np = _as_tensor(codes)
        w = self.world
        g, p = w.grid_size, w.patch_size
        if c.ndim != 2 or c.shape[1] != w.num_tokens:
            raise ValueError(f"expected codes [B, {w.num_tokens}], got {tuple(c.shape)}")
        if c.dtype.is_floating_point or c.dtype == torch.bool:
            raise TypeError(f"codes must be integers, got {c.dtype}")
        c = c.long()
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(c.min())}, {int(c.max())}]")
        book = self.codebook.to(c.device)
        b = c.shape[0]
        img = book[c].reshape(b, g, g, p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, 3)
        img = img.contiguous()
        return img.numpy() if was_np else img

    __call__ = decode


def make_decoder(**world_kwargs: Any) -> Callable[[ArrayLike], ArrayLike]:
    """A picklable callable ``codes long [B, N] -> uint8 images [B, H, W, 3]`` for ``ShapesWorld(**world_kwargs)``.

    Meant to be referenced by dotted path (``worlds.shapes.codebook.make_decoder``) in reward-actor configs.
    """
    return ShapesCodebook(**world_kwargs).decode
