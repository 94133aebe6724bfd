"""The reward worker: decodes and scores groups of samples in batches (one reward actor of the reward group).

Each item it scores is one group: ``codes`` (long [G, N], decoded on the worker by the decoder) or ``images``
(uint8 [G, H, W, 3]), plus ``prompts`` (G strings) and optionally ``metadata`` (G dicts). Groups can also come
as `Trajectory`s passed after the items (`score_groups(items, *trajectories)`): as a Ray actor call with object
references there, Ray starts the call once those trajectories exist, and reward actors run calls out of order,
so each rollout worker's groups are scored as soon as they arrive. The driver side is `cluster.reward_group.RewardGroup`.

Each reward gets what it declares in `Reward.needs` (`INPUTS`): the decoded images, the codes, or a trajectory
field; the worker decodes only when one of its rewards needs images.
"""
from __future__ import annotations

import os

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from rewards.base import build_rewards, import_object

Decoder = Callable[[torch.Tensor], torch.Tensor]

# Per-sample values a reward may name in `Reward.needs`, computed from its group's `Trajectory` (one value per
# rollout, plain numbers: they travel in the metadata, also to a reward server).
TRAJECTORY_INPUTS: dict[str, Callable[[Any], list]] = {
    "self_certainty": lambda t: t.certainty_score().tolist(),   # the rollout's mean over steps of Σ p log p (<= 0)
}
# Everything a reward may need: the decoded images, the image tokens (a list of ints per sample), trajectory fields.
INPUTS = ("images", "codes", *TRAJECTORY_INPUTS)


def decoder_from_spec(spec: Mapping[str, Any] | str | Decoder | None) -> Optional[Decoder]:
    """A codes -> images function from ``{"factory": "pkg.mod:make_decoder", **kwargs}`` (or a dotted path)."""
    if spec is None or callable(spec) and not isinstance(spec, str):
        return spec
    spec = {"factory": spec} if isinstance(spec, str) else dict(spec)
    if "factory" not in spec:
        raise ValueError(f"decoder spec {spec!r} needs 'factory': an import path to a function returning a decoder")
    factory = import_object(spec.pop("factory"))
    decoder = factory(**spec)
    if not callable(decoder):
        raise ValueError(f"decoder factory returned {type(decoder).__name__}, not a callable codes -> images")
    return decoder


@dataclass
class RewardResult:
    """One group's scores, as a reward actor returns them."""
    rewards: torch.Tensor                 # float32 [G]: the weighted sum the learner trains on
    components: dict[str, torch.Tensor]   # label -> [G]: each reward's raw score
    details: dict[str, torch.Tensor]      # "<label>/<key>" -> [G]: what a reward reports beside its score
    span: tuple[float, float]             # wall-clock (start, end) of the scoring call (the run's timeline)
    pid: int                              # the scoring process (a timeline lane per reward actor)


@dataclass
class _Sample:
    group: int
    codes: Optional[torch.Tensor]
    image: Optional[torch.Tensor]
    prompt: str
    meta: dict
    inputs: dict           # what the rewards need beside the image (`INPUTS`), by name


class RewardWorker:
    """Scores groups of samples: concatenates across groups up to `batch_size`, decodes codes, scores in batches.

    `rewards`: reward specs (``build_rewards``); `decoder`: ``{"factory": "pkg.mod:make_decoder", **kwargs}``, the
    factory returning ``codes long [B,N] -> uint8 [B,H,W,3]``; `device`: given to every reward spec that sets none
    (the reward must accept a ``device`` option, as the model rewards and ``geneval`` do). Plain class (testable
    without Ray); `cluster.reward_group` runs it as an actor of either backend.
    """

    def __init__(self, rewards: Sequence[Mapping[str, Any]], decoder: Mapping[str, Any] | str | None = None,
                 batch_size: int = 32, device: Optional[str] = None):
        specs = [dict(s) for s in rewards]
        if device is not None:
            for s in specs:
                s.setdefault("device", device)
        self.rewards = build_rewards(specs)
        needs = {label: reward.needs for label, _, reward in self.rewards.components}
        for label, names in needs.items():
            unknown = [n for n in names if n not in INPUTS]
            if unknown:
                raise ValueError(f"reward {label!r} needs {unknown}, which the reward worker cannot give: it gives "
                                 f"{list(INPUTS)}")
        self.needs = sorted({n for names in needs.values() for n in names})   # what this worker's rewards read
        self.decoder = decoder_from_spec(decoder)
        self.batch_size = int(batch_size)
        self._batch_sizes: list[int] = []
        self._calls = 0
        self._seconds = {"decode": 0.0, "score": 0.0}

    def labels(self) -> list[str]:
        return self.rewards.labels

    def ping(self) -> int:
        """This actor's process id: the pool notices a restart by it."""
        return os.getpid()

    def _flatten(self, items: Sequence[Mapping[str, Any]], trajectories: Sequence[Any] = ()) -> list[_Sample]:
        samples: list[_Sample] = []
        for g, item in enumerate(items):
            prompts = list(item["prompts"])
            codes, images = item.get("codes"), item.get("images")
            if (codes is None) == (images is None):
                raise ValueError(f"group {g}: give exactly one of 'codes' or 'images'")
            rows = codes if codes is not None else images
            if len(rows) != len(prompts):
                raise ValueError(f"group {g}: {len(rows)} samples but {len(prompts)} prompts")
            meta = list(item.get("metadata") or [{}] * len(prompts))
            if len(meta) != len(prompts):
                raise ValueError(f"group {g}: {len(prompts)} prompts but {len(meta)} metadata entries")
            if codes is not None and self.decoder is None and "images" in self.needs:
                raise ValueError("items carry 'codes' but this reward worker has no decoder configured")
            inputs = self._inputs(g, codes, trajectories[g] if trajectories else None)
            for i in range(len(prompts)):
                samples.append(_Sample(g, codes[i] if codes is not None else None,
                                       images[i] if images is not None else None, prompts[i], dict(meta[i]),
                                       {k: v[i] for k, v in inputs.items()}))
        return samples

    def _inputs(self, g: int, codes: Optional[torch.Tensor], trajectory: Any) -> dict[str, list]:
        """Group `g`'s per-sample values of what the rewards need beside images. A trajectory field of a group
        scored without its trajectory is not added: its metadata may carry it (as a reward server's client sends)."""
        out: dict[str, list] = {}
        for name in self.needs:
            if name == "codes":
                if codes is None:
                    raise ValueError(f"group {g}: a reward needs the codes, and the group came as images")
                out[name] = torch.as_tensor(codes).long().tolist()
            elif name in TRAJECTORY_INPUTS and trajectory is not None:
                try:
                    out[name] = TRAJECTORY_INPUTS[name](trajectory)
                except (ValueError, AttributeError) as e:
                    raise ValueError(f"group {g}: a reward needs {name!r} and the trajectory has none ({e})") from None
        return out

    def _images(self, chunk: Sequence[_Sample]) -> torch.Tensor:
        if "images" not in self.needs:          # no reward reads them: nothing to decode
            return torch.zeros(len(chunk), 0, 0, 3, dtype=torch.uint8)
        imgs: list[Optional[torch.Tensor]] = [s.image for s in chunk]
        coded = [i for i, s in enumerate(chunk) if s.codes is not None]
        if coded:
            t0 = time.perf_counter()
            decoded = torch.as_tensor(self.decoder(torch.stack([chunk[i].codes for i in coded]).long()))
            self._seconds["decode"] += time.perf_counter() - t0
            for j, i in enumerate(coded):
                imgs[i] = decoded[j]
        shapes = {tuple(x.shape) for x in imgs}
        if len(shapes) > 1:
            raise ValueError(f"samples in one batch have different image shapes {sorted(shapes)}")
        return torch.stack([x.to("cpu") for x in imgs]).to(torch.uint8)

    def score_groups(self, items: Sequence[Mapping[str, Any]], *trajectories: Any) -> list[RewardResult]:
        """One `RewardResult` per item (group). With `trajectories`, item i is scored on
        ``trajectories[i].final_codes``, and the trajectory gives the fields its rewards need (`TRAJECTORY_INPUTS`)."""
        start = time.time()
        self._calls += 1
        if trajectories:
            if len(trajectories) != len(items):
                raise ValueError(f"{len(trajectories)} trajectories for {len(items)} items")
            items = [{**it, "codes": tr.final_codes} for it, tr in zip(items, trajectories)]
        samples = self._flatten(items, trajectories)
        totals, comps, details = [], {l: [] for l in self.rewards.labels}, {}
        for s in range(0, len(samples), self.batch_size):
            chunk = samples[s:s + self.batch_size]
            images = self._images(chunk)
            t0 = time.perf_counter()
            out = self.rewards.score(images, [c.prompt for c in chunk], [c.meta for c in chunk],
                                     [c.inputs for c in chunk])
            self._seconds["score"] += time.perf_counter() - t0
            self._batch_sizes.append(len(chunk))
            totals.append(out.scores)
            for l, v in out.components.items():
                comps[l].append(v)
            for k, v in out.details.items():
                details.setdefault(k, []).append(v)
        total = torch.cat(totals) if totals else torch.zeros(0)
        comps = {l: torch.cat(v) if v else torch.zeros(0) for l, v in comps.items()}
        details = {k: torch.cat(v) for k, v in details.items()}
        groups = torch.tensor([smp.group for smp in samples], dtype=torch.long)
        result = []
        span = (start, time.time())
        for g in range(len(items)):
            sel = groups == g
            result.append(RewardResult(total[sel].clone(), {l: v[sel].clone() for l, v in comps.items()},
                                       {k: v[sel].clone() for k, v in details.items()}, span, os.getpid()))
        return result

    def stats(self) -> dict[str, Any]:
        """Batch sizes scored so far, calls, samples and seconds spent decoding / scoring."""
        return {"batch_sizes": list(self._batch_sizes), "calls": self._calls, "samples": sum(self._batch_sizes),
                "seconds": dict(self._seconds)}
