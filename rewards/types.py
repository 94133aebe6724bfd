"""Data shared by the reward library: GenEval prompt metadata and object detections.

Detectors (Mask2Former + CLIP colours for real images, the exact shapes-world detector for the synthetic world)
all return `Detection`s; the GenEval rule engine consumes them, so the same engine scores both worlds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Detection:
    """One detected object in one image. Box is (x0, y0, x1, y1) in pixels, x to the right, y down."""
    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: Optional[np.ndarray] = None     # bool [H, W], when the detector gives one (used for colour)
    color: Optional[str] = None           # set by a detector that knows colours exactly, else classified later


@dataclass
class GenEvalItem:
    """One line of GenEval's `evaluation_metadata.jsonl`: the prompt and what a correct image must show."""
    prompt: str
    tag: str
    include: list[dict[str, Any]]                 # [{"class": str, "count": int, "color"?: str, "position"?: [rel, idx]}]
    exclude: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "GenEvalItem":
        missing = [k for k in ("prompt", "tag", "include") if k not in obj]
        if missing:
            raise ValueError(f"GenEval metadata line lacks {missing}: {obj!r}")
        return GenEvalItem(prompt=obj["prompt"], tag=obj["tag"], include=list(obj["include"]),
                           exclude=list(obj.get("exclude", [])))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tag": self.tag, "include": self.include, "prompt": self.prompt}
        if self.exclude:
            d["exclude"] = self.exclude
        return d
