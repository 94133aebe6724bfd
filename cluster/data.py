"""Training and evaluation prompts, and the deterministic order in which training steps draw them."""
from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig

from worlds.shapes.world import make_splits

from .config import plain
from .prompts import PromptItem, read_prompts


def shapes_world_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return plain(cfg.policy.decoder.shapes) or {}


def _shapes_split(cfg: DictConfig, which: str) -> list[PromptItem]:
    train, heldout = make_splits(shapes_world_kwargs(cfg), seed=0)
    items = train if which == "train" else heldout
    return [PromptItem(it.prompt, {k: v for k, v in it.to_json().items() if k != "prompt"}) for it in items]


def train_prompts(cfg: DictConfig) -> list[PromptItem]:
    return read_prompts(cfg.data.train_prompts) if cfg.data.train_prompts else _shapes_split(cfg, "train")


def eval_prompts(cfg: DictConfig) -> list[PromptItem]:
    items = read_prompts(cfg.data.eval_prompts) if cfg.data.eval_prompts else _shapes_split(cfg, "heldout")
    if cfg.data.eval_max_prompts:
        # keep every category represented: take prompts round-robin over tags
        by_tag: dict[str, list[PromptItem]] = {}
        for it in items:
            by_tag.setdefault(str(it.metadata.get("tag", "")), []).append(it)
        picked: list[PromptItem] = []
        while len(picked) < min(cfg.data.eval_max_prompts, len(items)):
            for tag in sorted(by_tag):
                if by_tag[tag] and len(picked) < cfg.data.eval_max_prompts:
                    picked.append(by_tag[tag].pop(0))
        items = picked
    return items


class PromptSchedule:
    """Which prompts step s trains on: epochs of seeded permutations, so a resumed run draws the same prompts."""

    def __init__(self, num_prompts: int, per_step: int, seed: int):
        self.num_prompts, self.per_step, self.seed = num_prompts, per_step, seed

    def indices(self, step: int) -> list[int]:
        out = []
        start = step * self.per_step
        for k in range(start, start + self.per_step):
            epoch, pos = divmod(k, self.num_prompts)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
            out.append(int(perm[pos]))
        return out

    def seeds(self, step: int, slot: int, group_size: int) -> list[int]:
        """Per-sample sampler seeds of group `slot` of step `step` (distinct across steps, slots and samples)."""
        base = (self.seed * 1_000_003 + step) * 10_007 + slot
        return [int(base * 101 + g) % (2**62) for g in range(group_size)]
