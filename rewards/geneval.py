"""The GenEval rule engine and the ``geneval`` reward.

The engine follows GenEval's ``evaluate_images.py`` (djghosh13/geneval) on lists of ``Detection``s, so the same
rules score real images (Mask2Former + CLIP colours) and the synthetic shapes world (exact detector):

* per class keep detections with score > 0.3 (> 0.9 for *every* class when the prompt's tag is "counting"),
  highest score first, at most 16 per class, no NMS;
* an include clause ``{"class", "count"}`` needs >= count detections; its colour and position are judged on the
  top ``count`` of them: all of them must have the colour, and each must stand in the relation to each object of
  the target clause (which must itself have been met);
* an exclude clause ``{"class", "count"}`` fails when >= count detections remain;
* position of A relative to B: per axis the centre offset shrunk by 0.1 x (sum of the two boxes' sizes on that
  axis) towards 0, divided by the length of the raw offset; "left of" if x < -0.5, "right of" if x > 0.5,
  "above" if y < -0.5, "below" if y > 0.5 (y grows downwards); no relation when the shrunk offset is ~0.

Requirements (the denominator of ``GenEvalResult.fraction``): for each include clause one for its count, one for
its colour (if it names one) and one for its position (if it names one); one for each exclude clause. A colour
requirement is met only if its count is met; a position requirement only if the clause's count and colour are
met, the target clause is fully met and every pair is in the relation (exactly when GenEval would pass it).
So ``fraction == 1`` iff the strict GenEval verdict is correct.

Counting credit (``count_credit="graded"``, `CountCredit`): a count requirement that is not met earns part of its
requirement instead of nothing. With c the detections of the clause's class (above the threshold): an include
clause asking for at least n earns ``min(c, n) / n``; an exclude clause allowing fewer than m (m >= 1) earns
``min(1, (m − 1) / c)``. Both lie in [0, 1], are 1 exactly when GenEval's rule holds, and fall with the distance
from the target (for GenEval's counting prompts, include n and exclude n + 1, the count credit is
``min(c, n) / max(c, n)`` over the two clauses). Colour and position requirements stay 0/1 and still need the
count met; ``GenEvalResult.credit`` is the graded sum (``met`` and ``correct`` stay GenEval's).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from rewards.base import EvaluationSummary, PromptScores, Reward, RewardOutput, register_reward
from rewards.detectors import ColorClassifier, Detector, build_color_classifier, build_detector
from rewards.types import GENEVAL_COLORS, GENEVAL_TAGS, Detection, GenEvalItem

# The 80 COCO classes in the detector's label order, spelled as GenEval's object_names.txt spells them.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# GenEval's prompt set (djghosh13/geneval `prompts/`, MIT licence; see data/geneval/README.md), shipped in the package.
DATA_DIR = Path(__file__).resolve().parent / "data" / "geneval"
GENEVAL_METADATA = DATA_DIR / "evaluation_metadata.jsonl"
GENEVAL_OBJECT_NAMES = DATA_DIR / "object_names.txt"

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1
MODEL_SPECS = ("mask2former", "clip")   # detector / colour-classifier names that run a model (take `device`)


class CountCredit(StrEnum):
    """How a count requirement that is not met is scored: ``exact`` 0 (GenEval), ``graded`` a share (module doc)."""
    exact = "exact"
    graded = "graded"


def include_count_credit(found: int, n: int) -> float:
    """Credit of an include clause "at least n" with `found` detections: min(found, n) / n."""
    return min(found, n) / n if n > 0 else 1.0


def exclude_count_credit(found: int, m: int) -> float:
    """Credit of an exclude clause "fewer than m" with `found` detections: min(1, (m - 1) / found)."""
    return 1.0 if found < m else (m - 1) / found


@dataclass
class GenEvalResult:
    """Verdict for one image: strict ``correct``, ``met`` of ``total`` requirements, and why it failed.
    ``credit``: the requirements met counted with graded counting credit (``met`` when not computed)."""
    correct: bool
    met: int
    total: int
    reason: str = ""
    asked: int = 0     # objects the prompt's include clauses ask for
    found: int = 0     # objects detected above the confidence threshold
    credit: Optional[float] = None

    @property
    def fraction(self) -> float:
        return self.met / self.total if self.total else 1.0

    @property
    def graded_fraction(self) -> float:
        """``credit / total``: the fraction with counting credit (equals ``fraction`` when all counts are met)."""
        credit = self.met if self.credit is None else self.credit
        return credit / self.total if self.total else 1.0


def select_objects(detections: Sequence[Detection], tag: str, threshold: float = THRESHOLD,
                   counting_threshold: float = COUNTING_THRESHOLD,
                   max_objects: int = MAX_OBJECTS) -> dict[str, list[Detection]]:
    """Per class: detections above the confidence threshold, best first, at most `max_objects`."""
    thr = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -float(d.score)):   # stable: ties keep detector order
        if float(det.score) > thr:
            objs = by_class.setdefault(det.label, [])
            if len(objs) < max_objects:
                objs.append(det)
    return by_class


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_MARGIN) -> set[str]:
    """Relations of box A to box B among {"left of", "right of", "above", "below"} (see the module doc)."""
    a, b = np.asarray(box_a[:4], dtype=np.float64), np.asarray(box_b[:4], dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    size_sum = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - margin * size_sum, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _own_color(det: Detection, classname: str) -> str:
    if det.color is None:
        raise ValueError(f"a {classname!r} detection has no colour and no colour classifier is configured")
    return det.color


def evaluate(item: GenEvalItem, objects: Mapping[str, Sequence[Detection]],
             color_of: Optional[Callable[[Detection, str], str]] = None,
             margin: float = POSITION_MARGIN) -> GenEvalResult:
    """Judge one image from its selected objects (``select_objects``); ``color_of(det, class)`` names colours."""
    color_of = color_of or _own_color
    met = total = 0
    partial = 0.0      # graded credit of the count requirements that are not met
    reasons: list[str] = []
    groups: list[Optional[Sequence[Detection]]] = []   # per include clause: its objects if fully met, else None
    for req in item.include:
        cls, n = req["class"], int(req["count"])
        found = list(objects.get(cls, []))[:n]
        total += 1 + ("color" in req) + ("position" in req)
        ok = len(found) >= n
        if ok:
            met += 1
        else:
            partial += include_count_credit(len(objects.get(cls, [])), n)
            reasons.append(f"expected {cls}>={n}, found {len(objects.get(cls, []))}")
        if "color" in req and ok:
            colors = [color_of(d, cls) for d in found]
            k = colors.count(req["color"])
            if k >= n:
                met += 1
            else:
                ok = False
                seen = ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors)
                reasons.append(f"expected {req['color']} {cls}>={n}, found {k} {req['color']}; and {seen}")
        if "position" in req and ok:
            rel, target = req["position"][0], int(req["position"][1])
            targets = groups[target] if 0 <= target < len(groups) else None
            if targets is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                for obj, tgt in ((o, t) for o in found for t in targets):
                    rels = relative_position(obj.box, tgt.box, margin)
                    if rel not in rels:
                        ok = False
                        found_rel = " and ".join(sorted(rels)) or "no relation to"
                        reasons.append(f"expected {cls} {rel} target, found {found_rel} target")
                        break
                if ok:
                    met += 1
        groups.append(found if ok else None)
    for req in item.exclude:
        cls, n = req["class"], int(req["count"])
        total += 1
        k = len(objects.get(cls, []))
        if k >= n:
            partial += exclude_count_credit(k, n)
            reasons.append(f"expected {cls}<{n}, found {k}")
        else:
            met += 1
    return GenEvalResult(correct=met == total, met=met, total=total, reason="\n".join(reasons),
                         credit=met + partial)


def color_queries(item: GenEvalItem, objects: Mapping[str, Sequence[Detection]]) -> list[tuple[Detection, str]]:
    """The detections (with their class) whose colour ``evaluate`` will ask for and that carry none."""
    out: list[tuple[Detection, str]] = []
    seen: set[tuple[int, str]] = set()
    for req in item.include:
        cls, n = req["class"], int(req["count"])
        found = list(objects.get(cls, []))
        if "color" not in req or len(found) < n:
            continue
        for d in found[:n]:
            if d.color is None and (id(d), cls) not in seen:
                seen.add((id(d), cls))
                out.append((d, cls))
    return out


class GenEvalEngine:
    """GenEval's rules with its constants as options, batched over images (one colour-classifier call per batch)."""

    def __init__(self, threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
                 max_objects: int = MAX_OBJECTS, position_margin: float = POSITION_MARGIN,
                 color_classifier: Optional[ColorClassifier] = None):
        self.threshold, self.counting_threshold = threshold, counting_threshold
        self.max_objects, self.margin = max_objects, position_margin
        self.color_classifier = color_classifier

    def select(self, detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
        return select_objects(detections, tag, self.threshold, self.counting_threshold, self.max_objects)

    def evaluate_batch(self, items: Sequence[GenEvalItem], detections: Sequence[Sequence[Detection]],
                       images: Optional[torch.Tensor] = None) -> list[GenEvalResult]:
        if len(items) != len(detections):
            raise ValueError(f"{len(items)} GenEval items but detections for {len(detections)} images")
        objects = [self.select(d, it.tag) for it, d in zip(items, detections)]
        queries = [(i, d, cls) for i, (it, objs) in enumerate(zip(items, objects)) for d, cls in color_queries(it, objs)]
        colors: dict[tuple[int, str], str] = {}
        if queries:
            if self.color_classifier is None or images is None:
                why = "no colour classifier is configured" if self.color_classifier is None else "no images were given"
                raise ValueError(f"{len(queries)} detections need a colour but the detector gave none and {why}")
            names = self.color_classifier.classify(images, queries)
            if len(names) != len(queries):
                raise ValueError(f"colour classifier returned {len(names)} colours for {len(queries)} queries")
            colors = {(id(d), cls): c for (_, d, cls), c in zip(queries, names)}

        def color_of(det: Detection, cls: str) -> str:
            return det.color if det.color is not None else colors[(id(det), cls)]
        return [evaluate(it, objs, color_of, self.margin) for it, objs in zip(items, objects)]


def summarize_geneval(tags: Sequence[str], correct: Sequence[bool | float]) -> dict[str, Any]:
    """Per-category accuracy and overall = mean of the category accuracies (GenEval's headline number).

    Returns ``{"overall": x, "categories": {tag: acc}, "counts": {tag: n}, "images": n}``; categories are the tags
    present, in GENEVAL_TAGS order first.
    """
    if len(tags) != len(correct):
        raise ValueError(f"{len(tags)} tags but {len(correct)} verdicts")
    sums: dict[str, list[float]] = {}
    for t, c in zip(tags, correct):
        sums.setdefault(t, []).append(float(c))
    order = [t for t in GENEVAL_TAGS if t in sums] + sorted(t for t in sums if t not in GENEVAL_TAGS)
    cats = {t: float(np.mean(sums[t])) for t in order}
    return {"overall": float(np.mean(list(cats.values()))) if cats else float("nan"), "categories": cats,
            "counts": {t: len(sums[t]) for t in order}, "images": len(tags)}


def item_from_metadata(prompt: str, meta: Mapping[str, Any]) -> GenEvalItem:
    """A GenEvalItem from a sample's metadata: a GenEval metadata line, either flat or under key "geneval"."""
    m = meta.get("geneval", meta)
    if "include" not in m or "tag" not in m:
        raise ValueError(f"GenEval reward needs each sample's metadata to be a GenEval line (tag, include[, exclude]) "
                         f"or hold one under 'geneval'; got keys {sorted(meta)} for prompt {prompt!r}")
    return GenEvalItem.from_json({"prompt": prompt, **m})


@register_reward("geneval")
class GenEvalReward(Reward):
    """GenEval as a reward: the fraction of requirements met (``strict: true`` for GenEval's 0/1 verdict).

    ``detector``: a detector spec (e.g. ``{"name": "mask2former", "path": ...}`` or the shapes world's) or a
    Detector; ``color_classifier``: a spec (e.g. ``{"name": "clip", "path": ...}``) used for detections without an
    exact colour. ``device`` is passed on to the model-based specs ("mask2former", "clip") that set none.
    Details logged: ``strict`` (0/1), ``fraction`` and ``objects`` (objects detected above the threshold: the
    evaluation report's per-prompt count histogram comes from it).
    """

    def __init__(self, detector: Mapping[str, Any] | Detector, color_classifier: Mapping[str, Any] | None = None,
                 strict: bool = False, threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
                 max_objects: int = MAX_OBJECTS, position_margin: float = POSITION_MARGIN,
                 batch_size: Optional[int] = None, device: Optional[str] = None,
                 max_extra_objects: Optional[int] = None, precision_weighted: bool = False,
                 count_credit: CountCredit | str = CountCredit.exact):
        """`max_extra_objects`: when set, an image showing more than this many detected objects (above the
        confidence threshold) beyond those the prompt asks for fails and meets none of its requirements (fraction
        0). GenEval itself has no such rule, so a policy trained on its partial credit learns to flood the image
        with objects to satisfy "at least N" clauses; this closes that loophole (unset: GenEval's verdicts)."""
        self.max_extra_objects = max_extra_objects
        # `count_credit`: "graded" gives near-miss counts a share of their requirement (module doc); the extra-object
        # guard still zeroes an image over its allowance, and the strict verdict is unchanged
        if count_credit not in tuple(CountCredit):
            raise ValueError(f"geneval count_credit={count_credit!r}: choose one of {[c.value for c in CountCredit]}")
        self.count_credit = CountCredit(count_credit)
        # `precision_weighted`: the fraction is multiplied by asked/found objects when more are found than asked,
        # a dense penalty for unrequested objects (the strict verdict is unchanged).
        self.precision_weighted = precision_weighted
        self.threshold = threshold
        if device is not None:   # e.g. set by a RewardWorker: the models' device, unless their spec names one
            detector, color_classifier = (
                dict(s, device=s.get("device", device)) if isinstance(s, Mapping) and s.get("name") in MODEL_SPECS
                else s for s in (detector, color_classifier))
        self.detector = build_detector(detector)
        clf = build_color_classifier(color_classifier) if color_classifier is not None else None
        self.engine = GenEvalEngine(threshold, counting_threshold, max_objects, position_margin, clf)
        self.strict = strict
        self.batch_size = batch_size

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> list[GenEvalResult]:
        """Full verdicts (with reasons) for a batch, e.g. for evaluation scripts."""
        items = [item_from_metadata(p, m) for p, m in zip(prompts, metadata)]
        detections = self.detector.detect(images)
        if len(detections) != len(items):
            raise ValueError(f"detector returned {len(detections)} lists for {len(items)} images")
        out = []
        for item, dets, r in zip(items, detections, self.engine.evaluate_batch(items, detections, images)):
            r.asked = sum(int(c.get("count", 1)) for c in item.include)
            r.found = sum(1 for d in dets if d.score > self.threshold)
            if self.max_extra_objects is not None and r.found - r.asked > self.max_extra_objects:
                reason = "; ".join(x for x in (r.reason, f"{r.found - r.asked} extra objects") if x)
                r = GenEvalResult(False, 0, r.total, reason, r.asked, r.found, credit=0.0)
            out.append(r)
        return out

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]):
        results = self.evaluate(images, prompts, metadata)
        strict = torch.tensor([float(r.correct) for r in results], dtype=torch.float32)
        graded = self.count_credit == CountCredit.graded
        frac = torch.tensor([r.graded_fraction if graded else r.fraction for r in results], dtype=torch.float32)
        if self.precision_weighted:   # min(1, asked / found): a dense penalty for unrequested objects
            frac = frac * torch.tensor([min(1.0, r.asked / r.found) if r.found else 1.0 for r in results],
                                       dtype=torch.float32)
        objects = torch.tensor([float(r.found) for r in results], dtype=torch.float32)
        return RewardOutput(scores=strict if self.strict else frac,
                            details={"strict": strict, "fraction": frac, "objects": objects})

    @classmethod
    def prompt_problem(cls, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Optional[str]:
        bare = [i for i, m in enumerate(metadata) if "include" not in m.get("geneval", m)]
        if not bare:
            return None
        return (f"the geneval reward needs GenEval metadata (tag, include) for every prompt, and {len(bare)} of "
                f"{len(metadata)} have none (e.g. line {bare[0] + 1}): use a GenEval .jsonl "
                f"(data/geneval/evaluation_metadata.jsonl) or another reward")

    @classmethod
    def summarize_evaluation(cls, label: str, prompts: Sequence[PromptScores]) -> EvaluationSummary:
        """Beside the score's metric (`label`), GenEval's strict verdicts (the ``strict`` detail): the metric
        ``<label>/strict`` (each prompt's accuracy; overall the mean of the categories' accuracies, GenEval's
        headline), the report's ``overall``, ``categories``, ``counts``, ``images`` (`summarize_geneval`), and in
        each prompt's entry its ``accuracy`` and ``objects`` (its images by the number of objects detected in
        them, e.g. ``{"2": 9, "3": 7}``)."""
        summary = super().summarize_evaluation(label, prompts)
        if not prompts or any("strict" not in p.details for p in prompts):
            return summary
        verdicts = [list(p.details["strict"]) for p in prompts]
        entries = []
        for p, v in zip(prompts, verdicts):
            entry: dict[str, Any] = {"accuracy": sum(v) / max(len(v), 1)}
            if "objects" in p.details:
                found = Counter(int(n) for n in p.details["objects"])
                entry["objects"] = {str(n): c for n, c in sorted(found.items())}
            entries.append(entry)
        summary.metrics[f"{label}/strict"] = ([e["accuracy"] for e in entries], "groups")
        report = summarize_geneval([p.tag for p, v in zip(prompts, verdicts) for _ in v], [x for v in verdicts for x in v])
        return EvaluationSummary(summary.metrics, report, entries, verdicts)
