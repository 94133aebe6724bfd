"""Held-out means with 95 % intervals: a bootstrap over prompts, stratified by prompt group.

An evaluation draws several images per prompt, and the images of one prompt are not independent (they share its
difficulty), so the unit of resampling is the prompt: each resample draws, within every group (GenEval category,
Parti category, or the one group "all"), as many prompts as the group has, with replacement, and recomputes the
statistic from those prompts' mean scores. The interval is the 2.5th and 97.5th percentile of `RESAMPLES`
resamples (a percentile bootstrap). Why this and not a t-interval over per-prompt means:

* the statistic keeps its own form: GenEval's overall is the mean of the categories' accuracies (aggregate
  ``"groups"``), not the mean over prompts (``"prompts"``), and the bootstrap resamples that very statistic;
* scores need not be normal: strict verdicts are 0/1 with few images per prompt, and an interval stays in the
  range the scores can take;
* strata fixed at their sizes: a prompt set is built with a set number of prompts per category, so only the
  within-group spread is sampling noise (a group of one prompt contributes its value and no spread).

The generator is seeded (`SEED`), so the same report gives the same interval, and every evaluation of a run
resamples the same prompt indices. A group of fewer than two prompts has no interval (``None``); percentile
intervals of small groups (a few prompts) are too narrow, so read those with care.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0
AGGREGATES = ("prompts", "groups")


def _groups(tags: Sequence[str]) -> dict[str, np.ndarray]:
    """Prompt indices per group, groups in alphabetical order."""
    out: dict[str, list[int]] = {}
    for i, t in enumerate(tags):
        out.setdefault(str(t), []).append(i)
    return {t: np.asarray(out[t]) for t in sorted(out)}


def _statistic(group_means: dict[str, np.ndarray], sizes: dict[str, int], aggregate: str) -> np.ndarray:
    stacked = np.stack(list(group_means.values()))               # [groups, ...]
    if aggregate == "groups":
        return stacked.mean(0)
    w = np.array([sizes[t] for t in group_means], dtype=float)
    return np.tensordot(w / w.sum(), stacked, axes=1)


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return [float(lo), float(hi)]


def mean_interval(values: Sequence[float], tags: Sequence[str], aggregate: str = "prompts",
                  resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """The mean of per-prompt `values` (one per prompt; `tags` its group) with its 95 % interval, overall and per
    group: ``{"mean", "ci95": [lo, hi] | None, "n", "groups": {tag: {"mean", "ci95", "n"}}}``. `aggregate`
    ``"prompts"``: the mean over prompts; ``"groups"``: the mean of the groups' means."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r}: choose one of {AGGREGATES}")
    v = np.asarray(values, dtype=float)
    if len(v) != len(tags):
        raise ValueError(f"{len(v)} values but {len(tags)} tags")
    if not len(v):
        return {"mean": float("nan"), "ci95": None, "n": 0, "groups": {}}
    groups = _groups(tags)
    sizes = {t: len(ix) for t, ix in groups.items()}
    means = {t: v[ix].mean() for t, ix in groups.items()}
    rng = np.random.default_rng(seed)
    boot = {t: v[ix][rng.integers(0, len(ix), size=(resamples, len(ix)))].mean(1) for t, ix in groups.items()}
    can = any(n > 1 for n in sizes.values())
    return {"mean": float(_statistic(means, sizes, aggregate)),
            "ci95": _interval(_statistic(boot, sizes, aggregate)) if can else None,
            "n": len(v),
            "groups": {t: {"mean": float(means[t]), "ci95": _interval(boot[t]) if sizes[t] > 1 else None,
                           "n": sizes[t]} for t in groups}}


def paired_change(before: Sequence[float], after: Sequence[float], tags: Sequence[str],
                  aggregate: str = "prompts") -> dict[str, Any]:
    """After − before on the same prompts, with the 95 % interval of the per-prompt differences' statistic (the
    same bootstrap: a prompt's two evaluations are resampled together)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} prompts before but {len(after)} after")
    return mean_interval(np.asarray(after, float) - np.asarray(before, float), tags, aggregate)


def format_interval(ci: Optional[Sequence[float]], signed: bool = False) -> str:
    if not ci:
        return "[n/a]"
    f = "+.4g" if signed else ".4g"
    return f"[{ci[0]:{f}}, {ci[1]:{f}}]"
