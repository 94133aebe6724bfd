"""The reward worker: decodes and scores groups of samples in batches (one reward actor of the reward group).

Each item it scores is one group: ``codes`` (long [G, N], decoded on the worker by the decoder) or ``images``
(uint8 [G, H, W, 3]), plus ``prompts`` (G strings) and optionally ``metadata`` (G dicts). Groups can also come
as `Trajectory`s passed after the items (`score_groups(items, *trajectories)`): as a Ray actor call with object
references there, Ray starts the call once those trajectories exist, and reward actors run calls out of order,
so each rollout worker's groups are scored as soon as they arrive. The driver side is `cluster.reward_group.RewardGroup`.
"""
from __future__ import annotations

import os

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from rewards.base import build_rewards, import_object
from rewards.self_certainty import trajectory_metadata

Decoder = Callable[[torch.Tensor], torch.Tensor]


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
    details: dict[str, torch.Tensor]      # key -> [G]: what a reward reports beside its score (e.g. "geneval/strict")
    span: tuple[float, float]             # wall-clock (start, end) of the scoring call (the run's timeline)
    pid: int                              # the scoring process (a timeline lane per reward actor)

    def strict_verdicts(self) -> torch.Tensor:
        """GenEval's 0/1 verdicts (the `<label>/strict` detail of a GenEval reward); without a GenEval reward, the
        reward itself thresholded at 0.5."""
        keys = [k for k in self.details if k == "strict" or k.endswith("/strict")]
        return self.details[keys[0]] if keys else (self.rewards >= 0.5).float()

    def objects_found(self) -> Optional[torch.Tensor]:
        """Objects detected in each image (the `<label>/objects` detail of a GenEval reward); None without one."""
        keys = [k for k in self.details if k == "objects" or k.endswith("/objects")]
        return self.details[keys[0]] if keys else None


@dataclass
class _Sample:
    group: int
    codes: Optional[torch.Tensor]
    image: Optional[torch.Tensor]
    prompt: str
    meta: dict


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

    def _flatten(self, items: Sequence[Mapping[str, Any]]) -> list[_Sample]:
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
            if codes is not None and self.decoder is None:
                raise ValueError("items carry 'codes' but this reward worker has no decoder configured")
            for i in range(len(prompts)):
                samples.append(_Sample(g, codes[i] if codes is not None else None,
                                       images[i] if images is not None else None, prompts[i], dict(meta[i])))
        return samples

    def _images(self, chunk: Sequence[_Sample]) -> torch.Tensor:
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
        ``trajectories[i].final_codes``, its metadata extended with the trajectory's per-sample fields
        (``self_certainty``: `rewards.self_certainty.trajectory_metadata`)."""
        start = time.time()
        self._calls += 1
        if trajectories:
            if len(trajectories) != len(items):
                raise ValueError(f"{len(trajectories)} trajectories for {len(items)} items")
            items = [{**it, "codes": tr.final_codes, "metadata": trajectory_metadata(it.get("metadata"), tr)}
                     for it, tr in zip(items, trajectories)]
        samples = self._flatten(items)
        totals, comps, details = [], {l: [] for l in self.rewards.labels}, {}
        for s in range(0, len(samples), self.batch_size):
            chunk = samples[s:s + self.batch_size]
            images = self._images(chunk)
            t0 = time.perf_counter()
            out = self.rewards.score(images, [c.prompt for c in chunk], [c.meta for c in chunk])
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
