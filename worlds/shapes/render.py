"""Scene renderer of the shapes world: draws, for each prompt, a random scene that satisfies it.

Every object occupies one whole patch (one image token) and is one codebook pattern of
:class:`~worlds.shapes.codebook.ShapesCodebook`, so a rendered scene is *exactly* its code sequence decoded:
rendering = sampling a layout of codes (:meth:`ShapesRenderer.sample_codes`) + one batched ``decode``.

Layout rules (all randomness from the caller's ``numpy.random.Generator``, so results are reproducible):

* each ``include`` entry gets exactly ``count`` objects of its class, on distinct random patches;
* an object's colour is the entry's ``color`` when given, else uniform over ``world.colors``;
* ``position: [rel, i]`` (both entries of count 1) places the object relative to entry ``i``'s object so that
  GenEval's relative-position test holds: for "left of" the object's column is smaller than the target's and
  ``|row difference| <= |column difference|`` (symmetrically for the other relations), which passes GenEval's
  0.1 x (box sizes) margin and its 0.5 direction-cosine threshold for patch-sized boxes;
* optionally up to ``max_distractors`` extra objects whose classes appear in neither ``include`` nor ``exclude``
  (so they never change the prompt's GenEval verdict).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional, Sequence

import numpy as np

from worlds.shapes.codebook import ShapesCodebook
from worlds.shapes.world import ShapesWorld, WorldLike, as_world
from rewards.types import GenEvalItem


def relation_pairs(world: ShapesWorld, relation: str) -> np.ndarray:
    """All ``(target_cell, object_cell)`` pairs (row-major patch indices, int64 ``[M, 2]``) where an object at
    ``object_cell`` is ``relation`` the target at ``target_cell`` under the renderer's rule (see module doc)."""
    g = world.grid_size
    cells = np.arange(g * g)
    r, c = cells // g, cells % g
    dr = r[None, :] - r[:, None]          # [target, object]: object row - target row
    dc = c[None, :] - c[:, None]
    if relation == "left of":
        ok = (dc < 0) & (np.abs(dr) <= -dc)
    elif relation == "right of":
        ok = (dc > 0) & (np.abs(dr) <= dc)
    elif relation == "above":
        ok = (dr < 0) & (np.abs(dc) <= -dr)
    elif relation == "below":
        ok = (dr > 0) & (np.abs(dc) <= dr)
    else:
        raise ValueError(f"unknown relation {relation!r}")
    return np.argwhere(ok).astype(np.int64)


class ShapesRenderer:
    """Samples prompt-satisfying layouts and renders them (see the module docstring)."""

    def __init__(self, world: WorldLike = None, **world_kwargs: Any) -> None:
        self.world: ShapesWorld = as_world(world, **world_kwargs)
        self.codebook = ShapesCodebook(self.world)
        self._pairs = {rel: relation_pairs(self.world, rel) for rel in self.world.relations}

    def _objects(self, item: GenEvalItem) -> tuple[list[int], list[int], Optional[tuple[str, int, int]]]:
        """(shape indices, colour indices or -1, optional (relation, target slot, object slot)) of an item."""
        w = self.world
        shapes: list[int] = []
        colors: list[int] = []
        first_slot: list[int] = []
        position = None
        for j, req in enumerate(item.include):
            cls, n = req["class"], int(req.get("count", 1))
            if cls not in w.shapes:
                raise ValueError(f"class {cls!r} of prompt {item.prompt!r} is not a shape of this world {w.shapes}")
            col = req.get("color")
            if col is not None and col not in w.colors:
                raise ValueError(f"colour {col!r} of prompt {item.prompt!r} is not a colour of this world {w.colors}")
            first_slot.append(len(shapes))
            shapes += [w.shapes.index(cls)] * n
            colors += [-1 if col is None else w.colors.index(col)] * n
            if req.get("position"):
                rel, tgt = req["position"][0], int(req["position"][1])
                if position is not None or not 0 <= tgt < j or n != 1 or int(item.include[tgt].get("count", 1)) != 1:
                    raise ValueError(f"unsupported position structure in {item.prompt!r}: one positioned entry of "
                                     "count 1 relative to an earlier entry of count 1 is supported")
                if rel not in self._pairs:
                    raise ValueError(f"relation {rel!r} of prompt {item.prompt!r} is not in {w.relations}")
                position = (rel, first_slot[tgt], first_slot[j])
        return shapes, colors, position

    def sample_codes(self, items: Sequence[GenEvalItem], rng: np.random.Generator,
                     max_distractors: int = 0) -> np.ndarray:
        """Random prompt-satisfying layouts as token codes, int64 ``[B, N]``."""
        w = self.world
        n_tok, n_col = w.num_tokens, len(w.colors)
        b = len(items)
        keys = rng.random((b, n_tok))                 # argsort(keys) = random distinct cells per image
        obj_b: list[int] = []
        obj_rank: list[int] = []                  # rank of each object's cell in argsort(keys)
        obj_shape: list[int] = []
        obj_color: list[int] = []
        for i, item in enumerate(items):
            shapes, colors, position = self._objects(item)
            if max_distractors > 0:
                used = {r["class"] for r in list(item.include) + list(item.exclude)}
                free = [k for k, s in enumerate(w.shapes) if s not in used]
                if free:
                    n_extra = int(rng.integers(0, max_distractors + 1))
                    shapes += [free[k] for k in rng.integers(0, len(free), size=n_extra)]
                    colors += [-1] * n_extra
            if len(shapes) > n_tok:
                raise ValueError(f"prompt {item.prompt!r} needs {len(shapes)} objects but the grid has {n_tok} cells")
            k = len(shapes)
            rank = list(range(k))                      # object slot -> rank of its cell in argsort(keys[i])
            if position is not None:
                rel, t_slot, o_slot = position
                pairs = self._pairs[rel]
                t_cell, o_cell = pairs[rng.integers(0, len(pairs))]
                keys[i, t_cell], keys[i, o_cell] = -2.0, -1.0      # the pair sorts first: ranks 0 and 1
                rest = [s for s in range(k) if s not in (t_slot, o_slot)]
                rank = [0] * k
                rank[t_slot], rank[o_slot] = 0, 1
                for r, s in enumerate(rest):
                    rank[s] = 2 + r
            obj_b += [i] * k
            obj_rank += rank
            obj_shape += shapes
            obj_color += colors
        order = np.argsort(keys, axis=1, kind="stable")
        ob = np.asarray(obj_b, dtype=np.int64)
        cells = order[ob, np.asarray(obj_rank, dtype=np.int64)] if len(ob) else np.zeros(0, dtype=np.int64)
        col = np.asarray(obj_color, dtype=np.int64)
        rand_col = rng.integers(0, n_col, size=len(col))
        col = np.where(col < 0, rand_col, col)
        codes = np.zeros((b, n_tok), dtype=np.int64)
        codes[ob, cells] = 1 + np.asarray(obj_shape, dtype=np.int64) * n_col + col
        return codes

    def render_batch(self, items: Sequence[GenEvalItem], rng: np.random.Generator,
                     max_distractors: int = 0) -> np.ndarray:
        """Random prompt-satisfying scenes, uint8 ``[B, H, W, 3]``."""
        return self.codebook.decode(self.sample_codes(items, rng, max_distractors))


@lru_cache(maxsize=16)
def _renderer(world: ShapesWorld) -> ShapesRenderer:
    return ShapesRenderer(world)


def get_renderer(world: WorldLike = None) -> ShapesRenderer:
    """A cached :class:`ShapesRenderer` for ``world`` (default world when ``None``)."""
    return _renderer(as_world(world))


def sample_codes(items: Sequence[GenEvalItem], rng: np.random.Generator, world: WorldLike = None,
                 max_distractors: int = 0) -> np.ndarray:
    """Module-level :meth:`ShapesRenderer.sample_codes` on a cached renderer."""
    return get_renderer(world).sample_codes(items, rng, max_distractors)


def render_batch(items: Sequence[GenEvalItem], rng: np.random.Generator, world: WorldLike = None,
                 max_distractors: int = 0) -> np.ndarray:
    """Module-level :meth:`ShapesRenderer.render_batch` on a cached renderer: uint8 ``[B, H, W, 3]``."""
    return get_renderer(world).render_batch(items, rng, max_distractors)
