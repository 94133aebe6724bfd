"""The reward interface, the registry of rewards by name, and weighted combinations of rewards.

A reward scores a batch of generated images against their prompts (and per-sample metadata such as GenEval
clauses). Every reward is built from a spec ``{"name": ..., "weight": ..., **kwargs}``:

    reward = build_reward({"name": "hpsv2", "path": "/ckpt/HPS_v2.1_compressed.pt"})
    combo = build_rewards([{"name": "hpsv2", "weight": 1.0, "path": ...},
                           {"name": "geneval", "weight": 0.5, "detector": {...}}])
    out = combo.score(images, prompts, metadata)   # out.scores, out.components["hpsv2"], ...

A reward declares what it reads in ``needs`` (a class attribute): ``"images"`` (the default), ``"codes"`` or a
trajectory field such as ``"self_certainty"``; the reward worker gives each reward exactly those (`Reward.needs`).
A reward also says how its scores read on held-out prompts (`Reward.summarize_evaluation`): by default its mean
score; GenEval adds its strict verdicts.

Names resolve through the registry (``register_reward``); built-in rewards are imported lazily on first use, and
a name of the form ``"package.module:Attribute"`` imports any factory (useful for plugins and test-only rewards).
"""
from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

import torch


class RewardError(RuntimeError):
    """A reward failed or produced an invalid score; ``reward`` names it, ``sample`` is the batch index if known."""

    def __init__(self, reward: str, message: str, sample: Optional[int] = None):
        super().__init__(message)
        self.reward = reward
        self.sample = sample

    def __reduce__(self):  # keep the fields when pickled across processes (Ray)
        return (type(self), (self.reward, str(self), self.sample))


@dataclass
class RewardOutput:
    """Scores of one batch: ``scores`` float32 [B]; ``details`` optional extra float32 [B] tensors to log."""
    scores: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MultiRewardOutput(RewardOutput):
    """A weighted sum of rewards. ``components`` holds each reward's raw (unweighted) scores by label."""
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- validation

def check_batch(images: torch.Tensor, prompts: Sequence[str],
                metadata: Optional[Sequence[Mapping[str, Any]]]) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Validate a scoring batch: uint8 [B,H,W,3] images, B prompts, B metadata dicts (None -> empty dicts)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"rewards take uint8 images of shape [B, H, W, 3], got {desc}")
    b = images.shape[0]
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image, not a single string")
    prompts = list(prompts)
    if len(prompts) != b:
        raise ValueError(f"{b} images but {len(prompts)} prompts")
    metadata = [{} for _ in range(b)] if metadata is None else [dict(m or {}) for m in metadata]
    if len(metadata) != b:
        raise ValueError(f"{b} images but {len(metadata)} metadata entries")
    return images, prompts, metadata


def check_scores(label: str, scores: Any, batch: int, what: str = "score") -> torch.Tensor:
    """Return `scores` as float32 [B] on the CPU; raise RewardError naming the reward and sample on NaN/inf."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    scores = scores.detach().to("cpu", torch.float32).reshape(-1) if scores.numel() == batch else scores
    if tuple(scores.shape) != (batch,):
        raise RewardError(label, f"reward {label!r} returned {what}s of shape {tuple(scores.shape)} "
                                 f"for a batch of {batch}")
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        kind = "NaN" if math.isnan(float(scores[i])) else "an infinite value"
        raise RewardError(label, f"reward {label!r} returned {kind} as {what} for sample {i} of the batch "
                                 f"({bad.numel()} non-finite of {batch})", sample=i)
    return scores


def _as_output(out: RewardOutput | torch.Tensor) -> RewardOutput:
    return out if isinstance(out, RewardOutput) else RewardOutput(scores=out)


def concat_outputs(outs: Sequence[RewardOutput]) -> RewardOutput:
    """Concatenate the outputs of consecutive micro-batches."""
    if len(outs) == 1:
        return outs[0]
    keys = outs[0].details.keys()
    return RewardOutput(scores=torch.cat([o.scores for o in outs]),
                        details={k: torch.cat([o.details[k] for o in outs]) for k in keys})


# ---------------------------------------------------------------------------------------------- interface

@dataclass
class PromptScores:
    """One held-out prompt's images as one reward scored them (`Reward.summarize_evaluation`)."""
    prompt: str
    tag: str                               # the prompt's group (its metadata's "tag"; "all" without one)
    scores: list[float]                    # the reward's raw score of each image
    details: dict[str, list[float]]        # its details of each image, by key without the label (e.g. "strict")


@dataclass
class EvaluationSummary:
    """What a reward contributes to a held-out evaluation report (`cluster.evaluate`).

    ``metrics``: metric name -> (one value per prompt, aggregate); the report gives each its mean and 95 % interval
    overall and per prompt group. Aggregate ``"prompts"``: the mean over prompts; ``"groups"``: the mean of the
    groups' means (GenEval's overall). ``verdicts``: per prompt, a 0/1 verdict per image: a report with verdicts
    has the reward's ``report`` keys at its top level and ``prompts`` keys in each prompt's entry, and its grids
    frame each image by its verdict (without verdicts they caption the score)."""
    metrics: dict[str, tuple[list[float], str]]
    report: dict[str, Any] = field(default_factory=dict)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    verdicts: Optional[list[list[float]]] = None


class Reward(ABC):
    """Base class: subclasses implement ``_score`` on one micro-batch (at most ``batch_size`` images).

    ``score`` validates the inputs, splits the batch into micro-batches, concatenates and validates the outputs
    (float32 [B], finite: a NaN raises RewardError naming the reward and the sample index).

    ``needs``: what the reward reads besides the prompts and their metadata (GenEval's clauses, tags). The reward
    worker gives it exactly these (`rewards.worker.INPUTS`): ``"images"``, uint8 [B, H, W, 3] decoded from the
    codes (a reward that does not name them gets an empty [B, 0, 0, 3] tensor, and a worker none of whose rewards
    names them decodes nothing); ``"codes"``, each sample's image tokens as ``metadata["codes"]`` (a list of
    ints); a trajectory field, e.g. ``"self_certainty"``, as ``metadata["self_certainty"]`` (a float). Inputs
    travel in the metadata as plain numbers, so a reward reads them the same way behind the reward server.
    """
    name: str = "reward"
    batch_size: Optional[int] = None
    needs: tuple[str, ...] = ("images",)

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Optional[Sequence[Mapping[str, Any]]] = None) -> RewardOutput:
        images, prompts, metadata = check_batch(images, prompts, metadata)
        b = images.shape[0]
        step = self.batch_size or max(b, 1)
        outs = [_as_output(self._score(images[i:i + step], prompts[i:i + step], metadata[i:i + step]))
                for i in range(0, b, step)]
        out = concat_outputs(outs) if outs else RewardOutput(torch.zeros(0))
        return RewardOutput(scores=check_scores(self.name, out.scores, b),
                            details={k: check_scores(self.name, v, b, what=f"detail {k!r}")
                                     for k, v in out.details.items()})

    __call__ = score

    @abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput | torch.Tensor:
        """Score one micro-batch of uint8 [b,H,W,3] images."""

    @classmethod
    def prompt_problem(cls, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Optional[str]:
        """What makes these prompts unusable for this reward (e.g. GenEval without its clauses), or None. The
        config checks every prompt file against every reward with it before any actor starts."""
        return None

    @classmethod
    def summarize_evaluation(cls, label: str, prompts: Sequence[PromptScores]) -> EvaluationSummary:
        """The reward's held-out metrics from its scores of every prompt's images: here one, named `label`, the
        mean score of each prompt averaged over prompts. A reward with more to say (GenEval: strict verdicts,
        objects found) overrides it. Runs in the driver, on the class: no model is loaded."""
        return EvaluationSummary(metrics={label: ([float(np.mean(p.scores)) if p.scores else float("nan")
                                                   for p in prompts], "prompts")})


# ---------------------------------------------------------------------------------------------- registry

_REWARDS: dict[str, Callable[..., Reward]] = {}
# Built-in rewards live in their own modules, imported on first use so that `import rewards` stays light.
_BUILTIN_REWARDS = {
    "clip_score": "rewards.clip_score",
    "hpsv2": "rewards.hpsv2",
    "pickscore": "rewards.pickscore",
    "aesthetic": "rewards.aesthetic",
    "geneval": "rewards.geneval",
    "self_certainty": "rewards.self_certainty",
    "remote": "rewards.remote",
}


def import_object(path: str) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``) and return the attribute."""
    mod_name, sep, attr = path.partition(":")
    if not sep:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:attribute'")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} for {path!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def resolve_factory(name: str, registry: dict[str, Callable], builtin: Mapping[str, str], kind: str) -> Callable:
    """Find a factory by registered name, built-in name (imported lazily) or import path."""
    if name not in registry and name in builtin:
        importlib.import_module(builtin[name])
    if name in registry:
        return registry[name]
    if ":" in name or "." in name:
        return import_object(name)
    known = sorted(set(registry) | set(builtin))
    raise ValueError(f"unknown {kind} {name!r}: known {kind}s are {known}, or give an import path "
                     f"'package.module:Factory'")


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class decorator: make a reward buildable as ``build_reward({"name": name, ...})``."""
    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REWARDS and _REWARDS[name] is not factory:
            raise ValueError(f"reward name {name!r} is already registered to {_REWARDS[name]!r}")
        _REWARDS[name] = factory
        if isinstance(factory, type):
            factory.name = name
        return factory
    return deco


def reward_names() -> list[str]:
    """Every reward name that ``build_reward`` knows (registered or built in)."""
    return sorted(set(_REWARDS) | set(_BUILTIN_REWARDS))


def reward_class(spec: Mapping[str, Any] | str) -> type[Reward]:
    """The class a reward spec builds, without building it (its `summarize_evaluation`); `Reward` when the name
    does not resolve to a Reward subclass here (a factory function, or code that only its own `runtime_env` can
    import)."""
    name = spec if isinstance(spec, str) else spec.get("name")
    try:
        factory = resolve_factory(str(name), _REWARDS, _BUILTIN_REWARDS, "reward")
    except (ValueError, ImportError):
        return Reward
    return factory if isinstance(factory, type) and issubclass(factory, Reward) else Reward


def build_reward(spec: Mapping[str, Any] | str) -> Reward:
    """Build one reward from ``{"name": ..., **kwargs}`` (``weight`` and ``label`` are ignored here). ``needs``
    adds inputs to those the reward's class declares, for a reward that passes them on (e.g. ``remote``:
    ``needs: [images, self_certainty]`` when the server's rewards read the sampler's self-certainty)."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    if "name" not in spec:
        raise ValueError(f"reward spec {spec!r} has no 'name'")
    name = spec.pop("name")
    spec.pop("weight", None)
    label = spec.pop("label", None)
    extra = spec.pop("needs", None) or []
    if isinstance(extra, str) or not all(isinstance(n, str) for n in extra):
        raise ValueError(f"reward {name!r}: needs must be a list of input names, e.g. [images, self_certainty], "
                         f"not {extra!r}")
    factory = resolve_factory(name, _REWARDS, _BUILTIN_REWARDS, "reward")
    try:
        reward = factory(**spec)
    except TypeError as e:
        raise ValueError(f"cannot build reward {name!r} with options {sorted(spec)}: {e}") from e
    if not isinstance(reward, Reward):
        raise ValueError(f"factory for reward {name!r} returned {type(reward).__name__}, not a Reward")
    reward.name = label or name   # errors and logs name the reward as the config does
    if extra:
        reward.needs = tuple(dict.fromkeys([*reward.needs, *extra]))
    return reward


# ---------------------------------------------------------------------------------------------- combination

class WeightedRewards:
    """A weighted sum of several rewards that also returns each one's raw scores (to log mean/std separately)."""

    def __init__(self, components: Sequence[tuple[str, float, Reward]]):
        labels = [c[0] for c in components]
        dup = sorted({l for l in labels if labels.count(l) > 1})
        if dup:
            raise ValueError(f"reward labels must be unique, {dup} repeat: give each a distinct 'label'")
        if not components:
            raise ValueError("WeightedRewards needs at least one reward")
        self.components = [(label, float(w), r) for label, w, r in components]

    @property
    def labels(self) -> list[str]:
        return [c[0] for c in self.components]

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Optional[Sequence[Mapping[str, Any]]] = None,
              inputs: Optional[Sequence[Mapping[str, Any]]] = None) -> MultiRewardOutput:
        """Each reward scores the batch with what it `needs`: the images only if it names them, and the values of
        the per-sample `inputs` (e.g. ``{"self_certainty": -1.2}``, one dict per sample) that it names, added to
        each sample's metadata. Without `inputs` (the reward server) the metadata is passed as it came."""
        images, prompts, metadata = check_batch(images, prompts, metadata)
        b = images.shape[0]
        if inputs is not None and len(inputs) != b:
            raise ValueError(f"{b} images but {len(inputs)} input entries")
        total = torch.zeros(b, dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        details: dict[str, torch.Tensor] = {}
        for label, weight, reward in self.components:
            own = metadata if inputs is None else [
                {**m, **{k: inp[k] for k in reward.needs if k in inp}} for m, inp in zip(metadata, inputs)]
            try:
                out = reward.score(images if "images" in reward.needs else images[:, :0, :0], prompts, own)
            except RewardError as e:
                if e.reward == label:
                    raise
                raise RewardError(label, f"reward {label!r}: {e}", e.sample) from e
            except Exception as e:
                raise RewardError(label, f"reward {label!r} failed on a batch of {b}: "
                                         f"{type(e).__name__}: {e}") from e
            raw = check_scores(label, out.scores, b)
            components[label] = raw
            details.update({f"{label}/{k}": check_scores(label, v, b, f"detail {k!r}") for k, v in out.details.items()})
            total += weight * raw
        return MultiRewardOutput(scores=total, details=details, components=components,
                                 weights={label: w for label, w, _ in self.components})

    __call__ = score


def build_rewards(specs: Sequence[Mapping[str, Any]]) -> WeightedRewards:
    """Build a WeightedRewards from a list of specs; each may set ``weight`` (default 1) and ``label``."""
    comps = []
    for spec in specs:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        label = spec.get("label") or spec.get("name")
        comps.append((label, float(spec.get("weight", 1.0)), build_reward(spec)))
    return WeightedRewards(comps)


def summarize(out: MultiRewardOutput | RewardOutput, prefix: str = "reward") -> dict[str, float]:
    """Mean and std of the total and of each component, for logging: ``{"reward/hpsv2/mean": ...}``."""
    def stats(x: torch.Tensor) -> tuple[float, float]:
        return float(x.mean()) if x.numel() else float("nan"), float(x.std()) if x.numel() > 1 else 0.0
    res: dict[str, float] = {}
    res[f"{prefix}/total/mean"], res[f"{prefix}/total/std"] = stats(out.scores)
    for label, x in getattr(out, "components", {}).items():
        res[f"{prefix}/{label}/mean"], res[f"{prefix}/{label}/std"] = stats(x)
    for key, x in out.details.items():
        res[f"{prefix}/{key}/mean"], _ = stats(x)
    return res
