"""Ray reward actors: a worker that decodes and scores groups of samples in batches, and a driver-side pool.

    pool = RewardPool.create(specs, num_actors=2, num_gpus=1,
                             decoder={"factory": "policy.bundle:make_image_decoder", "policy": {...}})
    # the shapes world: decoder={"factory": "rewards.shapes.tokenizer:make_decoder"}
    out = pool.score_groups([{"codes": codes_g0, "prompts": [...], "metadata": [...]}, ...])
    out[0]["rewards"]   # float32 [G] for group 0; out[0]["components"]["hpsv2"] its raw HPS scores

Each item is one group: ``codes`` (long [G, N], decoded on the worker by the decoder) or ``images`` (uint8
[G, H, W, 3]), plus ``prompts`` (G strings) and optionally ``metadata`` (G dicts).
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from rewards.base import RewardError, build_rewards, import_object

Decoder = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)


def build_decoder(spec: Mapping[str, Any] | str | Decoder | None) -> Optional[Decoder]:
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
    without Ray); ``make_reward_actor_cls`` turns it into a Ray actor class.
    """

    def __init__(self, rewards: Sequence[Mapping[str, Any]], decoder: Mapping[str, Any] | str | None = None,
                 batch_size: int = 32, device: Optional[str] = None):
        specs = [dict(s) for s in rewards]
        if device is not None:
            for s in specs:
                s.setdefault("device", device)
        self.rewards = build_rewards(specs)
        self.decoder = build_decoder(decoder)
        self.batch_size = int(batch_size)
        self._batch_sizes: list[int] = []
        self._calls = 0
        self._seconds = {"decode": 0.0, "score": 0.0}

    def labels(self) -> list[str]:
        return self.rewards.labels

    def ping(self) -> bool:
        return True

    @staticmethod
    def _resolve_trajectories(items: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Items may carry ``trajectory``: a Ray object reference to a `policy.trajectory.Trajectory` (the
        driver never fetches them); fetch them all at once here and score their final codes."""
        refs = [it["trajectory"] for it in items if "trajectory" in it]
        if not refs:
            return list(items)
        import ray
        fetched = iter(ray.get(refs))
        return [{**{k: v for k, v in it.items() if k != "trajectory"}, "codes": next(fetched).final_codes}
                if "trajectory" in it else it for it in items]

    def _flatten(self, items: Sequence[Mapping[str, Any]]) -> list[_Sample]:
        items = self._resolve_trajectories(items)
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

    def score_groups(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Per group: ``{"rewards": float32 [G], "components": {label: [G]}, "details": {key: [G]}}``."""
        self._calls += 1
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
        for g in range(len(items)):
            sel = groups == g
            result.append({"rewards": total[sel].clone(), "components": {l: v[sel].clone() for l, v in comps.items()},
                           "details": {k: v[sel].clone() for k, v in details.items()}})
        return result

    def stats(self) -> dict[str, Any]:
        """Batch sizes scored so far, calls, samples and seconds spent decoding / scoring."""
        return {"batch_sizes": list(self._batch_sizes), "calls": self._calls, "samples": sum(self._batch_sizes),
                "seconds": dict(self._seconds)}


def make_reward_actor_cls(num_gpus: float = 0, num_cpus: float = 1, max_restarts: int = 1,
                          **ray_options: Any):
    """The RewardWorker as a Ray actor class. Restarted up to `max_restarts` times if its process dies; calls are
    not retried by Ray (the RewardPool retries once itself, on another actor when there is one)."""
    import ray
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0,
                      **ray_options)(RewardWorker)


class RewardPoolError(RuntimeError):
    """A scoring call failed twice; ``reward`` names the failing reward (or the pool's rewards if unknown)."""

    def __init__(self, reward: str, message: str):
        super().__init__(message)
        self.reward = reward

    def __reduce__(self):
        return (type(self), (self.reward, str(self)))


@dataclass
class PendingScore:
    """A submitted call: the Ray object ref, which actor runs it, and the items (kept for a retry)."""
    ref: Any
    actor: int
    items: Sequence[Mapping[str, Any]]


def _failed_reward(err: BaseException) -> Optional[str]:
    """The reward named by a (Ray-wrapped) RewardError, if any."""
    for e in (err, getattr(err, "cause", None), getattr(err, "__cause__", None)):
        if isinstance(e, RewardError) or (e is not None and hasattr(e, "reward") and isinstance(e.reward, str)):
            return e.reward
    return None


class RewardPool:
    """Driver side: round-robins scoring calls over reward actors; retries a failed call once on the next actor
    (the same one, once Ray has restarted it, when the pool has only one) and then raises RewardPoolError naming
    the reward. `timeout_s` bounds each wait for a result (None: no limit)."""

    def __init__(self, actors: Sequence[Any], labels: Optional[Sequence[str]] = None,
                 timeout_s: Optional[float] = None, restart_timeout_s: float = 120.0):
        if not actors:
            raise ValueError("RewardPool needs at least one actor")
        self.actors = list(actors)
        self.labels = list(labels) if labels is not None else None
        self.timeout_s = timeout_s
        self.restart_timeout_s = restart_timeout_s
        self._next = itertools.count()
        self.retries = 0

    @classmethod
    def create(cls, rewards: Sequence[Mapping[str, Any]], num_actors: int = 1,
               decoder: Mapping[str, Any] | str | None = None, batch_size: int = 32, num_gpus: float = 0,
               num_cpus: float = 1, max_restarts: int = 1, device: Optional[str] = None,
               timeout_s: Optional[float] = None, **ray_options: Any) -> "RewardPool":
        """Start `num_actors` reward actors with the same rewards and decoder."""
        actor_cls = make_reward_actor_cls(num_gpus, num_cpus, max_restarts, **ray_options)
        actors = [actor_cls.remote(list(rewards), decoder, batch_size, device) for _ in range(num_actors)]
        labels = [r.get("label") or r["name"] for r in rewards]
        return cls(actors, labels, timeout_s)

    def _names(self) -> str:
        return ", ".join(self.labels) if self.labels else "the pool's rewards"

    def submit(self, items: Sequence[Mapping[str, Any]], actor: Optional[int] = None) -> PendingScore:
        """Start scoring `items` on the next actor (round robin) without waiting."""
        i = next(self._next) % len(self.actors) if actor is None else actor % len(self.actors)
        return PendingScore(self.actors[i].score_groups.remote(items), i, items)

    def result(self, pending: PendingScore) -> list[dict[str, Any]]:
        """Wait for a submitted call; on failure retry it once on the next actor, then raise RewardPoolError."""
        import ray
        try:
            return ray.get(pending.ref, timeout=self.timeout_s)
        except Exception as first:  # RayTaskError (an exception in a reward), RayActorError (actor died), timeout
            self.retries += 1
            target = (pending.actor + 1) % len(self.actors)
            log.warning("reward call failed on actor %d (%s: %s); retrying once on actor %d",
                        pending.actor, type(first).__name__, str(first).splitlines()[0] if str(first) else "", target)
            self._wait_ready(target)
            retry = self.submit(pending.items, actor=target)
            try:
                return ray.get(retry.ref, timeout=self.timeout_s)
            except Exception as second:
                name = _failed_reward(second) or _failed_reward(first) or self._names()
                raise RewardPoolError(name, f"reward {name} failed twice (actor {pending.actor}, then actor "
                                            f"{retry.actor}): {type(second).__name__}: {second}") from second

    def _wait_ready(self, i: int) -> None:
        """Wait (up to ``restart_timeout_s``) while actor `i` is restarting after its process died."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError
        deadline = time.monotonic() + self.restart_timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[i].ping.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                return
            except (ActorUnavailableError, GetTimeoutError):
                time.sleep(0.2)
            except Exception:   # dead for good (restarts exhausted) or broken: let the retry report it
                return

    def score_groups(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Score groups on one actor (blocking, with one retry)."""
        return self.result(self.submit(items))

    def map(self, batches: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[dict[str, Any]]]:
        """Score several lists of groups concurrently, one call per list spread round robin over the actors."""
        pending = [self.submit(b) for b in batches]
        return [self.result(p) for p in pending]

    def stats(self) -> list[dict[str, Any]]:
        import ray
        return ray.get([a.stats.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []
