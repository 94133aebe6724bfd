"""The synthetic "shapes world": configuration and GenEval-format prompt generation.

A scene is a ``grid_size x grid_size`` grid of square patches (``patch_size`` pixels each).  Every object occupies
exactly one patch and is drawn as a solid-colour shape mask (see :mod:`worlds.shapes.render` and
:mod:`worlds.shapes.codebook`), so scenes are exactly representable by a tiny codebook and exactly detectable.

Prompts follow GenEval's ``evaluation_metadata.jsonl`` format (``tag``, ``include``, ``exclude``, ``prompt``) with
the six GenEval tags and the same conventions, e.g. a position prompt "a photo of a square left of a circle" is::

    {"tag": "position",
     "include": [{"class": "circle", "count": 1},
                 {"class": "square", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a square left of a circle"}

and a counting prompt "a photo of two circles" excludes ``count + 1`` circles.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Union

import numpy as np

from policy.files import atomic_write_text
from rewards.types import GENEVAL_COLORS, GENEVAL_TAGS, GenEvalItem

# Exact RGB value used to draw each of GenEval's ten colours.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "purple": (128, 0, 160),
    "pink": (255, 150, 200),
    "brown": (140, 70, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                                8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}


def _mask_circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25


def _mask_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.ones_like(u, dtype=bool)


def _mask_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # right triangle with the right angle bottom-left (fills its bounding box's corners bottom-left, top-left, bottom-right)
    return u <= v


def _mask_ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
    return (r2 <= 0.25) & (r2 > 0.0625)


# Shape name -> mask function of pixel-centre coordinates (u to the right, v down, both in (0, 1)).
SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _mask_circle,
    "square": _mask_square,
    "triangle": _mask_triangle,
    "ring": _mask_ring,
}


def shape_mask(name: str, patch_size: int) -> np.ndarray:
    """Bool ``[patch_size, patch_size]`` mask of shape ``name`` (row = y, column = x)."""
    if name not in SHAPE_MASKS:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPE_MASKS)}")
    c = (np.arange(patch_size) + 0.5) / patch_size
    v, u = np.meshgrid(c, c, indexing="ij")
    return SHAPE_MASKS[name](u, v)


@dataclass(frozen=True)
class ShapesWorld:
    """Configuration of the shapes world.

    Attributes:
        image_size: side of the square image in pixels.
        grid_size: patches per side; ``image_size`` must be a multiple of it.  ``grid_size ** 2`` image tokens.
        shapes: object classes (keys of :data:`SHAPE_MASKS`); their masks must be pairwise distinct and non-empty
            at this patch size (patch size >= 4 for the defaults).
        colors: object colours, a subset of GenEval's ten; none may be drawn in the background's RGB.
        background: RGB of the empty canvas.
        relations: relative positions used by ``position`` prompts (subset of :data:`RELATIONS`).
        counts: object counts used by ``counting`` prompts (>= 2; ``count + 1`` objects must fit on the grid).
    """
    image_size: int = 32
    grid_size: int = 8
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    background: tuple[int, int, int] = (0, 0, 0)
    relations: tuple[str, ...] = RELATIONS
    counts: tuple[int, ...] = (2, 3, 4)

    def __post_init__(self) -> None:
        # accept lists (e.g. from OmegaConf / JSON) for the tuple fields
        for name in ("shapes", "colors", "relations"):
            object.__setattr__(self, name, tuple(str(x) for x in getattr(self, name)))
        for name in ("background", "counts"):
            object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "grid_size", int(self.grid_size))
        if self.grid_size < 2 or self.image_size % self.grid_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of grid_size {self.grid_size} >= 2")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be an RGB triple in [0, 255], got {self.background}")
        if not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes must be non-empty and distinct: {self.shapes}")
        if not self.colors or len(set(self.colors)) != len(self.colors):
            raise ValueError(f"colors must be non-empty and distinct: {self.colors}")
        for c in self.colors:
            if c not in GENEVAL_COLORS:
                raise ValueError(f"colour {c!r} is not one of GenEval's {GENEVAL_COLORS}")
            if COLOR_RGB[c] == tuple(self.background):
                raise ValueError(f"colour {c!r} is drawn in the background RGB {self.background}")
        for r in self.relations:
            if r not in RELATIONS:
                raise ValueError(f"unknown relation {r!r}; known: {RELATIONS}")
        for n in self.counts:
            if n < 2 or n not in NUMBER_WORDS or n + 1 > self.num_tokens:
                raise ValueError(f"bad count {n}: need 2 <= n <= {max(NUMBER_WORDS)} and n + 1 <= {self.num_tokens}")
        masks = [shape_mask(s, self.patch_size) for s in self.shapes]
        for s, m in zip(self.shapes, masks):
            if not m.any():
                raise ValueError(f"shape {s!r} is empty at patch size {self.patch_size}")
        for (s1, m1), (s2, m2) in itertools.combinations(zip(self.shapes, masks), 2):
            if np.array_equal(m1, m2):
                raise ValueError(f"shapes {s1!r} and {s2!r} are identical at patch size {self.patch_size}")

    @property
    def patch_size(self) -> int:
        """Side of one patch (= one image token) in pixels."""
        return self.image_size // self.grid_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per image (``grid_size ** 2``), row-major over the patch grid."""
        return self.grid_size * self.grid_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild this world via ``ShapesWorld(**d)``."""
        return {f.name: (list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple)
                         else getattr(self, f.name)) for f in fields(self)}


WorldLike = Union[ShapesWorld, dict, None]


def as_world(world: WorldLike = None, **kwargs: Any) -> ShapesWorld:
    """A :class:`ShapesWorld` from a world, a kwargs dict, or keyword arguments (defaults when nothing given)."""
    if isinstance(world, ShapesWorld):
        if kwargs:
            raise TypeError("pass either a ShapesWorld or keyword arguments, not both")
        return world
    return ShapesWorld(**{**(dict(world) if world else {}), **kwargs})


# --------------------------------------------------------------------------------------------------------- prompts

def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def all_prompts(world: WorldLike = None) -> list[GenEvalItem]:
    """Every prompt of the world, in a fixed order, grouped by GenEval tag.

    * ``single_object``: each shape.
    * ``two_object``: each ordered pair of distinct shapes.
    * ``counting``: each shape x count, excluding ``count + 1`` of that shape.
    * ``colors``: each colour x shape.
    * ``position``: each ordered pair of distinct shapes x relation ("a photo of A rel B": B is include[0],
      A is include[1] with ``position: [rel, 0]``).
    * ``color_attr``: each ordered pair of distinct shapes x ordered pair of distinct colours.
    """
    w = as_world(world)
    items: list[GenEvalItem] = []
    for s in w.shapes:
        items.append(GenEvalItem(prompt=f"a photo of {_a(s)}", tag="single_object",
                                 include=[{"class": s, "count": 1}]))
    for a, b in itertools.permutations(w.shapes, 2):
        items.append(GenEvalItem(prompt=f"a photo of {_a(a)} and {_a(b)}", tag="two_object",
                                 include=[{"class": a, "count": 1}, {"class": b, "count": 1}]))
    for s in w.shapes:
        for n in w.counts:
            items.append(GenEvalItem(prompt=f"a photo of {NUMBER_WORDS[n]} {_plural(s)}", tag="counting",
                                     include=[{"class": s, "count": n}], exclude=[{"class": s, "count": n + 1}]))
    for c in w.colors:
        for s in w.shapes:
            items.append(GenEvalItem(prompt=f"a photo of {_a(c + ' ' + s)}", tag="colors",
                                     include=[{"class": s, "count": 1, "color": c}]))
    for a, b in itertools.permutations(w.shapes, 2):
        for rel in w.relations:
            items.append(GenEvalItem(prompt=f"a photo of {_a(a)} {rel} {_a(b)}", tag="position",
                                     include=[{"class": b, "count": 1},
                                              {"class": a, "count": 1, "position": [rel, 0]}]))
    for a, b in itertools.permutations(w.shapes, 2):
        for ca, cb in itertools.permutations(w.colors, 2):
            items.append(GenEvalItem(prompt=f"a photo of {_a(ca + ' ' + a)} and {_a(cb + ' ' + b)}",
                                     tag="color_attr",
                                     include=[{"class": a, "count": 1, "color": ca},
                                              {"class": b, "count": 1, "color": cb}]))
    return items


def world_words(world: WorldLike = None) -> list[str]:
    """Every word of the world's prompts, lower-cased and sorted: the vocabulary of its word-level tokenizer."""
    return sorted({w for item in all_prompts(world) for w in item.prompt.lower().split()})


# How :func:`make_splits` chooses the held-out prompts (`world.split` in a run's config).
SPLITS: tuple[str, ...] = ("stratified", "count_transfer")


def count_transfer_pairs(world: WorldLike = None, seed: int = 0) -> list[tuple[int, str]]:
    """The (count, shape) pairs that the ``count_transfer`` split holds out: one per number word, each with its own
    shape (``world.counts[i]`` with ``world.shapes[perm[i]]``, ``perm`` a permutation drawn with ``seed``).

    Every number word then keeps ``len(shapes) - 1`` trained shapes, which must be at least three: with three shapes
    no (number, shape) pair can be held out without leaving that number word trained on two shapes only, and
    RL on counting then learns (shape -> count) rather than the number word (docs/rewards.md).
    """
    w = as_world(world)
    if len(w.shapes) < 4 or len(w.shapes) < len(w.counts):
        raise ValueError(f"split 'count_transfer' holds out one (number, shape) pair per number word, each with its own "
                         f"shape, and trains every number word with at least three shapes: it needs at least "
                         f"max(4, {len(w.counts)} counts) shapes, the world has {len(w.shapes)} {list(w.shapes)} "
                         f"(add 'ring': shapes=[circle, square, triangle, ring])")
    perm = np.random.default_rng([seed, 30]).permutation(len(w.shapes))
    return [(n, w.shapes[int(perm[i])]) for i, n in enumerate(w.counts)]


def make_splits(world: WorldLike = None, heldout_fraction: float = 0.25, seed: int = 0,
                split: str = "stratified") -> tuple[list[GenEvalItem], list[GenEvalItem]]:
    """Deterministic (seeded) train / held-out split of :func:`all_prompts`.

    ``stratified`` (the default): each tag's prompts are shuffled with ``seed`` and ``round(fraction * n)`` of them
    (at least one, and at least one left for training, when the tag has two or more prompts) are held out.

    ``count_transfer``: the other tags exactly as ``stratified`` holds them out; of the counting prompts, the
    pairs of :func:`count_transfer_pairs` (one per number word, distinct shapes; nothing when ``fraction`` is 0).
    Every number word is then trained with at least three shapes, and each held-out counting prompt is a
    (number, shape) pair that training never shows, with a number word and a shape that it does show.

    The splits are disjoint by prompt text and keep :func:`all_prompts` order within each split.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    w = as_world(world)
    items = all_prompts(w)
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for tag in GENEVAL_TAGS:
        idx = [i for i, it in enumerate(items) if it.tag == tag]
        n = len(idx)
        k = int(round(heldout_fraction * n))
        if heldout_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        chosen = [idx[j] for j in rng.permutation(n)[:k]]   # drawn for every tag: the other tags' draws stay put
        if split == "count_transfer" and tag == "counting":
            pairs = set(count_transfer_pairs(w, seed)) if heldout_fraction > 0 else set()
            chosen = [i for i in idx if (items[i].include[0]["count"], items[i].include[0]["class"]) in pairs]
        held.update(chosen)
    train = [it for i, it in enumerate(items) if i not in held]
    heldout = [it for i, it in enumerate(items) if i in held]
    return train, heldout


def write_jsonl(items: Iterable[GenEvalItem], path: Union[str, os.PathLike]) -> None:
    """Write items as GenEval metadata lines (``{"tag", "include", ["exclude"], "prompt"}``)."""
    atomic_write_text(path, "".join(json.dumps(it.to_json()) + "\n" for it in items))


def read_jsonl(path: Union[str, os.PathLike]) -> list[GenEvalItem]:
    """Read GenEval metadata lines (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [GenEvalItem.from_json(json.loads(line)) for line in f if line.strip()]


def write_splits(out_dir: Union[str, os.PathLike], world: WorldLike = None, heldout_fraction: float = 0.25,
                 seed: int = 0, split: str = "stratified") -> tuple[str, str]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` of :func:`make_splits` into ``out_dir``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    train, heldout = make_splits(world, heldout_fraction, seed, split)
    paths = (os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "heldout.jsonl"))
    write_jsonl(train, paths[0])
    write_jsonl(heldout, paths[1])
    return paths

