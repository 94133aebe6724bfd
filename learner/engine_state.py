"""A learner rank's engine state saved and restored by us, as data (`learner.state_files`), instead of DeepSpeed's
``save_checkpoint``/``load_checkpoint`` (which pickle, and unpickle with ``weights_only=False``).

What one rank writes (``engine/rankNNN.safetensors`` + ``.json``): DeepSpeed's optimizer ``state_dict()`` (for a
plain torch optimizer under ZeRO 0 its state dict; under ZeRO 1/2 the rank's fp32 master partition, Adam moments
and loss-scaler fields; under ZeRO 3 the rank's fp32 flat partitions and Adam moments), the LR scheduler's state
dict, DeepSpeed's step counters and the rank's RNG states. Restoring calls the same DeepSpeed methods its own
loader calls (``optimizer.load_state_dict`` with the per-rank list, the scheduler's ``load_state_dict``, the
checkpoint event hooks), so the numbers are DeepSpeed's; only the file format is ours. The module's weights are
not in these files: under ZeRO 0-2 they are loaded from the checkpoint's ``pytorch_model.safetensors``, under
ZeRO 3 DeepSpeed restores them from the fp32 partitions (as its own loader does).
"""
from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from policy.weights import CheckpointError

from .state_files import read_state, state_paths, write_state

if TYPE_CHECKING:
    from .engine import Learner

ENGINE_DIR = "engine"
STATE_FORMAT = 1


def rank_stem(directory: Path, rank: int) -> Path:
    return directory / ENGINE_DIR / f"rank{rank:03d}"


def rank_files(directory: Path, world_size: int) -> list[Path]:
    """Every file of the engine state of a checkpoint saved by `world_size` ranks."""
    return [p for r in range(world_size) for p in state_paths(rank_stem(directory, r))]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _event(engine: Any, which: str) -> None:
    """DeepSpeed's checkpoint event hooks (ZeRO-3: partition / re-gather the persistent parameters)."""
    has = getattr(engine, f"_optimizer_has_ckpt_event_{which}", None)
    if has is not None and has():
        getattr(engine.optimizer, f"checkpoint_event_{which}")()


def save_engine_state(learner: "Learner", directory: Path) -> list[Path]:
    """Write this rank's engine state under ``directory/engine/`` (every rank calls it); returns its files."""
    engine = learner.engine
    _event(engine, "prologue")
    try:
        tree = {"format": STATE_FORMAT, "rank": learner.rank, "world_size": learner.world_size,
                "zero_stage": learner.config.zero_stage,
                "optimizer": engine.optimizer.state_dict(),
                "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
                "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                "skipped_steps": int(engine.skipped_steps), "rng": rng_state()}
        return write_state(rank_stem(directory, learner.rank), tree)
    finally:
        _event(engine, "epilogue")


class _RankStates(Sequence):
    """The per-rank list DeepSpeed's ZeRO loaders take, read lazily: a rigid ZeRO checkpoint only reads its own
    rank's entry, so a rank never holds every rank's optimizer state at once."""

    def __init__(self, directory: Path, world_size: int, own_rank: int, own: dict[str, Any], objects: dict):
        self.directory, self.world_size, self.objects = directory, world_size, objects
        self._cache = {own_rank: own}

    def __len__(self) -> int:
        return self.world_size

    def __getitem__(self, r):  # type: ignore[override]
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(self.world_size))]
        if r not in self._cache:
            self._cache[r] = read_state(rank_stem(self.directory, r), self.objects)["optimizer"]
        return self._cache[r]


def load_engine_state(learner: "Learner", directory: Path) -> None:
    """Restore this rank's optimizer, scheduler, counters and RNG from ``directory/engine/`` (every rank calls it,
    after the module's weights are in place under ZeRO 0-2). CheckpointError when a file is not ours."""
    engine = learner.engine
    opt = engine.optimizer
    objects = {"loss_scaler": lambda fields: _loss_scaler(opt, fields)}
    state = read_state(rank_stem(directory, learner.rank), objects)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("rank") != learner.rank \
            or state.get("zero_stage") != learner.config.zero_stage:
        raise CheckpointError(f"{str(rank_stem(directory, learner.rank))!r}.json is not rank {learner.rank}'s "
                              f"ZeRO-{learner.config.zero_stage} engine state of this checkpoint")
    _event(engine, "prologue")
    try:
        if engine.zero_optimization():
            states = _RankStates(directory, int(state["world_size"]), learner.rank, state["optimizer"], objects)
            opt.load_state_dict(state_dict_list=states, load_optimizer_states=True,
                                load_from_fp32_weights=engine.zero_load_from_fp32_weights(), checkpoint_folder=None)
        elif engine.fp16_enabled() or engine.bfloat16_enabled():
            opt.load_state_dict(state["optimizer"], load_optimizer_states=True)
        else:
            opt.load_state_dict(state["optimizer"])
        if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
            engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        engine.global_steps = int(state["global_steps"])
        engine.global_samples = int(state["global_samples"])
        engine.skipped_steps = int(state["skipped_steps"])
    finally:
        _event(engine, "epilogue")
    set_rng_state(state["rng"])


def _loss_scaler(opt: Any, fields: dict[str, Any]) -> Any:
    """The optimizer's own loss scaler with the saved fields (its class and dtype come from this run's config)."""
    scaler = copy.copy(getattr(opt, "loss_scaler", None))
    if scaler is None:
        raise CheckpointError("the checkpoint holds a loss scaler but this learner's optimizer has none")
    for k, v in fields.items():
        if k in vars(scaler):
            setattr(scaler, k, v)
    return scaler
