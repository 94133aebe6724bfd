"""Object detectors and colour classifiers for the GenEval reward: protocols and registries.

A detector turns a batch of images into ``Detection``s (label = a COCO class name as GenEval spells it, score,
box in pixels, optional mask, optional exact colour). A colour classifier names the colour of detections that
lack one. Both are built from specs ``{"name": ..., **kwargs}``, by registered name or import path
(``"package.module:Factory"``); register with ``@register_detector("shapes")`` / ``@register_color_classifier``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from rewards.base import resolve_factory
from rewards.types import Detection


@runtime_checkable
class Detector(Protocol):
    """``detect(images uint8 [B,H,W,3]) -> B lists of Detection`` (any order; the engine sorts by score)."""

    def detect(self, images: torch.Tensor) -> list[list[Detection]]: ...


@runtime_checkable
class ColorClassifier(Protocol):
    """``classify(images, queries) -> one colour name (of GENEVAL_COLORS) per query``.

    Each query is ``(image index in the batch, detection, object class name)``; the classifier sees the whole batch
    so it can classify every query in one forward pass.
    """

    def classify(self, images: torch.Tensor, queries: Sequence[tuple[int, Detection, str]]) -> list[str]: ...


_DETECTORS: dict[str, Callable[..., Detector]] = {}
_COLOR_CLASSIFIERS: dict[str, Callable[..., ColorClassifier]] = {}
_BUILTIN_DETECTORS = {"mask2former": "rewards.mask2former", "shapes": "worlds.shapes.detector"}
_BUILTIN_COLOR_CLASSIFIERS = {"clip": "rewards.colors"}


def _register(registry: dict, name: str, kind: str) -> Callable:
    def deco(factory: Callable) -> Callable:
        if name in registry and registry[name] is not factory:
            raise ValueError(f"{kind} name {name!r} is already registered to {registry[name]!r}")
        registry[name] = factory
        return factory
    return deco


def register_detector(name: str) -> Callable:
    """Decorator: make a detector buildable as ``build_detector({"name": name, ...})``."""
    return _register(_DETECTORS, name, "detector")


def register_color_classifier(name: str) -> Callable:
    """Decorator: make a colour classifier buildable as ``build_color_classifier({"name": name, ...})``."""
    return _register(_COLOR_CLASSIFIERS, name, "colour classifier")


def _build(spec: Mapping[str, Any] | str, registry: dict, builtin: Mapping[str, str], kind: str) -> Any:
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    if "name" not in spec:
        raise ValueError(f"{kind} spec {spec!r} has no 'name'")
    name = spec.pop("name")
    factory = resolve_factory(name, registry, builtin, kind)
    try:
        return factory(**spec)
    except TypeError as e:
        raise ValueError(f"cannot build {kind} {name!r} with options {sorted(spec)}: {e}") from e


def build_detector(spec: Mapping[str, Any] | str | Detector) -> Detector:
    """A Detector from a spec (or the object itself, passed through)."""
    if isinstance(spec, (str, Mapping)):
        spec = _build(spec, _DETECTORS, _BUILTIN_DETECTORS, "detector")
    if not isinstance(spec, Detector):
        raise ValueError(f"{type(spec).__name__} has no detect(images) method")
    return spec


def build_color_classifier(spec: Mapping[str, Any] | str | ColorClassifier) -> ColorClassifier:
    """A ColorClassifier from a spec (or the object itself, passed through)."""
    if isinstance(spec, (str, Mapping)):
        spec = _build(spec, _COLOR_CLASSIFIERS, _BUILTIN_COLOR_CLASSIFIERS, "colour classifier")
    if not isinstance(spec, ColorClassifier):
        raise ValueError(f"{type(spec).__name__} has no classify(images, queries) method")
    return spec
