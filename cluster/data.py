"""Training and evaluation prompts, and the deterministic order in which training steps draw them."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from worlds.shapes.world import make_splits

from .config import PromptSampling, section, world_kwargs
from .prompts import PromptItem, read_prompts


def _shapes_split(cfg: DictConfig, which: str) -> list[PromptItem]:
    train, heldout = make_splits(world_kwargs(cfg), **section(cfg, "world").split_kwargs())
    items = train if which == "train" else heldout
    return [PromptItem(it.prompt, {k: v for k, v in it.to_json().items() if k != "prompt"}) for it in items]


def train_prompts(cfg: DictConfig) -> list[PromptItem]:
    return read_prompts(cfg.data.train_prompts) if cfg.data.train_prompts else _shapes_split(cfg, "train")


def prompt_tag(item: PromptItem) -> str:
    """A prompt's GenEval tag from its metadata ("" when it has none)."""
    return str(item.metadata.get("tag", ""))


def prompt_schedule(cfg: DictConfig, prompts: Sequence[PromptItem]) -> PromptSchedule:
    """The training prompts' schedule as `data.prompt_sampling` asks (by_tag: the GenEval tag of each prompt's
    metadata, drawn `data.tag_weights[tag]` times per tag epoch (1 when unnamed); prompts without a tag form one
    group)."""
    if cfg.data.prompt_sampling != PromptSampling.by_tag:
        return PromptSchedule(len(prompts), cfg.data.prompts_per_step, cfg.seed)
    tags = [prompt_tag(p) for p in prompts]
    named = dict(cfg.data.tag_weights or {})
    unknown = sorted(set(named) - set(tags))
    if unknown:
        raise ValueError(f"data.tag_weights names {unknown}, a tag no training prompt has (tags: {sorted(set(tags))}): "
                         "fix the name or drop it")
    return PromptSchedule(len(prompts), cfg.data.prompts_per_step, cfg.seed, tags,
                          {t: int(named.get(t, 1)) for t in set(tags)})


def eval_prompts(cfg: DictConfig) -> list[PromptItem]:
    items = read_prompts(cfg.data.eval_prompts) if cfg.data.eval_prompts else _shapes_split(cfg, "heldout")
    if cfg.data.eval_max_prompts:
        # keep every category represented: take prompts round-robin over tags
        by_tag: dict[str, list[PromptItem]] = {}
        for it in items:
            by_tag.setdefault(prompt_tag(it), []).append(it)
        picked: list[PromptItem] = []
        while len(picked) < min(cfg.data.eval_max_prompts, len(items)):
            for tag in sorted(by_tag):
                if by_tag[tag] and len(picked) < cfg.data.eval_max_prompts:
                    picked.append(by_tag[tag].pop(0))
        items = picked
    return items


EVAL_STEP, GENERATE_STEP = -1, -2     # the sample-seed streams of the held-out evaluation and `maskgrpo generate`


def sample_seeds(seed: int, step: int, slot: int, n: int) -> list[int]:
    """The one way to seed a sample: the `n` sampler seeds of group `slot` at `step` of a run with `seed`, each
    `stream base + 101 slot + sample` (distinct across steps, slots and samples for n up to 101). Training steps
    count from 0 (slots below 10 007); the held-out evaluation (`EVAL_STEP`, slot = prompt index) keeps the base it
    has had since the first release, so every evaluation table stays comparable; `maskgrpo generate`
    (`GENERATE_STEP`) has its own."""
    if step == EVAL_STEP:
        base = (seed + 7919) * 100_003
    elif step == GENERATE_STEP:
        base = (2**40 + seed) * 100_003
    else:
        base = (seed * 1_000_003 + step) * 10_007 * 101
    return [int(base + slot * 101 + g) % (2**62) for g in range(n)]


class PromptSchedule:
    """Which prompts step s trains on, from the step alone (no state), so a resumed run draws the same prompts.

    Without `tags`: epochs of seeded permutations of all prompts (each prompt once per epoch). With `tags` (one per
    prompt, `data.prompt_sampling: by_tag`): the draws come in tag epochs; a tag epoch holds each tag `weights[tag]`
    times (1 by default), in a seeded order, and each draw of a tag takes that tag's next prompt, from epochs of
    seeded permutations of its prompts. With equal weights every tag is trained as often as every other, whatever
    its share of the prompts (GenEval's overall score is the mean of the per-tag accuracies, so this weighs training
    as the score weighs it); integer weights tilt it, e.g. ``{counting: 2}`` draws counting twice per tag epoch.
    """

    def __init__(self, num_prompts: int, per_step: int, seed: int, tags: Optional[Sequence[str]] = None,
                 weights: Optional[Mapping[str, int]] = None):
        self.num_prompts, self.per_step, self.seed = num_prompts, per_step, seed
        self.by_tag: Optional[list[list[int]]] = None
        if tags is not None:
            if len(tags) != num_prompts:
                raise ValueError(f"{len(tags)} tags for {num_prompts} prompts")
            groups: dict[str, list[int]] = {}
            for i, t in enumerate(tags):
                groups.setdefault(str(t), []).append(i)
            names = sorted(groups)
            self.by_tag = [groups[t] for t in names]
            counts = [int((weights or {}).get(t, 1)) for t in names]
            if min(counts) < 0 or sum(counts) == 0:
                raise ValueError(f"data.tag_weights must be integers >= 0, one at least > 0; got "
                                 f"{dict(zip(names, counts))}")
            # one tag epoch before its shuffle: tag t repeated counts[t] times, and each slot's rank among its tag's
            self.epoch_tags = [t for t, c in enumerate(counts) for _ in range(c)]
            self.epoch_rank = [r for c in counts for r in range(c)]
            self.counts = counts

    def _draw(self, k: int) -> int:
        if self.by_tag is None:
            epoch, pos = divmod(k, self.num_prompts)
            return int(np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)[pos])
        tag_epoch, pos = divmod(k, len(self.epoch_tags))
        slot = int(np.random.default_rng([self.seed, 1, tag_epoch]).permutation(len(self.epoch_tags))[pos])
        t = self.epoch_tags[slot]
        members = self.by_tag[t]
        nth = tag_epoch * self.counts[t] + self.epoch_rank[slot]     # how many draws of tag t came before this one
        epoch, pos = divmod(nth, len(members))
        return members[int(np.random.default_rng([self.seed, 2, t, epoch]).permutation(len(members))[pos])]

    def indices(self, step: int) -> list[int]:
        start = step * self.per_step
        return [self._draw(k) for k in range(start, start + self.per_step)]

    def seeds(self, step: int, slot: int, group_size: int) -> list[int]:
        """Per-sample sampler seeds of group `slot` of step `step`."""
        return sample_seeds(self.seed, step, slot, group_size)
