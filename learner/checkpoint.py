"""Learner checkpoints: ``<root>/step_NNNNNN/`` holds

- the policy in its family's released layout (`MaskedModel.write_pretrained`; the manifest's ``weights`` lists
  its weight files), which both our loader and the authors' open: Show-o's ``pytorch_model.safetensors`` +
  ``config.json`` (+ ``llm/config.json`` for a Phi other than phi-1.5); Meissonic's ``transformer/config.json`` +
  ``transformer/diffusion_pytorch_model.safetensors``; gathered from all ranks under ZeRO-3, in the training dtype;
  a resume under ZeRO 0-2 loads the policy's weights from it;
- with LoRA (`learner.lora.rank` > 0) instead of those: ``adapter_config.json`` + ``adapter_model.safetensors``,
  the adapters in peft's own format (`learner.lora`; ``PeftModel.from_pretrained`` opens them on the base), the
  frozen base staying where ``policy.init`` points (``maskgrpo export`` merges them into full weights); a resume
  under ZeRO 0-2 loads the adapters from them;
- ``engine/rankNNN.safetensors`` + ``engine/rankNNN.json``: each rank's engine state as data (`learner.state_files`):
  DeepSpeed's optimizer state dict (fp32 master partitions and Adam moments, partitioned per rank under ZeRO; under
  ZeRO-3 the fp32 partitions are also where the weights are restored from), the LR scheduler, DeepSpeed's step
  counters and the rank's RNG states. DeepSpeed's own ``save_checkpoint``/``load_checkpoint`` are not used: they
  pickle, and their loader unpickles with ``weights_only=False``;
- ``trainer_state.json``: step / weight version / non-finite counters / the driver's state (incl. its advantage
  tracker);
- ``manifest.json`` (written last): format, step, world size, ZeRO stage, policy family, model config, the
  weight files, parameter shapes, and the size (and sha256) of every file.

Nothing in a checkpoint is a pickle, and loading one reads only safetensors and JSON, so a checkpoint is data:
a tampered one can hold wrong numbers, never code (see README, "What a checkpoint can do"). Checkpoints of format
1 (DeepSpeed's pickled ``engine/`` directory) are refused; their weights still serve as ``policy.init``.

Everything is written under a hidden temporary name (``.step_NNNNNN.tmp``) and renamed into place once complete,
so a crash never leaves a half-written directory under a checkpoint name; `latest_checkpoint` only returns
directories whose manifest is present. A corrupted or mismatched checkpoint raises `CheckpointError` before
anything is loaded, and loading never writes to the checkpoint directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from policy.files import atomic_write_json, disk_full_error, is_disk_full, remove_path, sha256_file, unused_path
from policy.weights import CheckpointError, load_strict

from . import dist
from .engine_state import load_engine_state, rank_files, save_engine_state
from .lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapters, read_adapters, read_settings, same_layout,
                   save_adapters)

if TYPE_CHECKING:
    from .config import LoraSettings
    from .engine import Learner

FORMAT = "maskgrpo-learner-checkpoint/2"
OLD_FORMATS = ("maskgrpo-learner-checkpoint/1",)
LEGACY_WEIGHTS = ("pytorch_model.safetensors",)   # the weight files of a manifest that lists none (Show-o's)
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d+)$")


class OldFormatError(CheckpointError):
    """A checkpoint of an earlier format (a pickled engine state): intact, but never resumed."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _read_manifest(path: Path) -> dict[str, Any]:
    m = path / MANIFEST
    if not m.is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete learner checkpoint (no {MANIFEST}): it was "
                              f"interrupted while being written, or is not a checkpoint directory")
    try:
        manifest = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(m)!r} is corrupted ({e})") from e
    if isinstance(manifest, dict) and manifest.get("format") in OLD_FORMATS:
        raise OldFormatError(f"{str(path)!r} was written by an earlier version of maskgrpo whose engine state is a "
                              f"pickle, which a resume would have to unpickle (code could run): it is not resumed. "
                              f"Start a new run from its weights with policy.init={str(path)!r} (a fresh optimizer)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(m)!r}: unknown checkpoint format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    return manifest


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the directories under `root` named like checkpoints and holding a manifest, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoint_step(path: str | Path) -> int:
    """The training step a checkpoint was saved at: its trainer_state.json, else its ``step_NNNNNN`` name, else 0
    (a release directory)."""
    path = Path(path)
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = _NAME.match(path.name)
        return int(m.group(1)) if m else 0


def pick_resume_checkpoint(root: str | Path) -> tuple[Optional[Path], str]:
    """The checkpoint `resume=auto` continues from — the newest one that verifies (manifest, sizes, sha256) — and
    one line saying which and why. A newer checkpoint that fails is renamed ``<name>.damaged`` (kept for
    inspection, never overwritten by the resumed run) and named in the line."""
    root = Path(root)
    candidates = sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
                        if (m := _NAME.match(p.name)) and p.is_dir())
    damaged: list[str] = []
    for step, p in reversed(candidates):
        try:
            verify_checkpoint(p)
        except OldFormatError:
            raise
        except CheckpointError as e:
            target = unused_path(p.with_name(p.name + ".damaged"))
            os.replace(p, target)
            damaged.append(f"{p.name} is damaged ({str(e).split(': ', 1)[-1]}; kept as {target.name})")
            continue
        why = "the newest checkpoint, verified" if not damaged else "the newest intact checkpoint; " + "; ".join(damaged)
        return p, f"resume=auto: continuing from {p} ({why})"
    if damaged:
        return None, f"resume=auto: no intact checkpoint under {root}, starting at step 0; " + "; ".join(damaged)
    return None, f"resume=auto: no checkpoint under {root} yet, starting at step 0"


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under `root` (None if there is none)."""
    for _, p in reversed(list_checkpoints(root)):
        try:
            _read_manifest(p)
        except CheckpointError:
            continue
        return p
    return None


def verify_checkpoint(path: str | Path, check_hash: bool = True) -> dict[str, Any]:
    """The manifest, after checking that every listed file exists with its size (and sha256)."""
    path = Path(path)
    manifest = _read_manifest(path)
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {rel!r} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: {rel!r} has {f.stat().st_size} bytes, "
                                  f"the manifest says {info['size']}")
        if check_hash and info.get("sha256") and sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: {rel!r} does not match its sha256")
    return manifest


def check_data_files(path: str | Path, manifest: dict[str, Any]) -> None:
    """Every file of the checkpoint is JSON or safetensors and parses as such, and every file a resume reads is
    listed: a checkpoint that passes holds data only, whoever made it (the sha256 in the manifest catch damage,
    not tampering, since whoever changes a file can rewrite the manifest too)."""
    from safetensors import safe_open
    path = Path(path)
    weights = [ADAPTER_CONFIG, ADAPTER_WEIGHTS] if manifest.get("lora") else list(weight_files(manifest))
    needed = [*weights, "trainer_state.json",
              *(f.relative_to(path).as_posix() for f in rank_files(path, int(manifest.get("world_size", 1))))]
    missing = [rel for rel in needed if rel not in manifest["files"]]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: its manifest lists no {missing[0]!r}")
    for rel in manifest["files"]:
        f = path / rel
        try:
            if rel.endswith(".json"):
                json.loads(f.read_text(encoding="utf-8"))
            elif rel.endswith(".safetensors"):
                with safe_open(str(f), framework="pt") as handle:
                    handle.keys()
            else:
                raise ValueError("neither .json nor .safetensors")
        except Exception as e:               # safetensors raises its own error types for a bad header
            raise CheckpointError(f"checkpoint {str(path)!r}: {rel!r} is not data ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); its manifest matches it, so the "
                                  f"file was replaced on purpose: refusing to load it. Resume from a checkpoint "
                                  f"you wrote, or start again from weights you trust") from None


def weight_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The policy's weight files a checkpoint holds (relative paths in its family's released layout)."""
    return tuple(manifest.get("weights") or LEGACY_WEIGHTS)


def _param_shapes(learner: "Learner") -> dict[str, list[int]]:
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in learner.policy.named_parameters()}


def _write_checkpoint_files(learner: "Learner", tmp: Path, final: Path, trainer_state: dict[str, Any],
                            hash_files: bool) -> None:
    """Everything of a checkpoint into the temporary directory `tmp` (to become `final`; all ranks), the manifest
    last."""
    rank = learner.rank
    lora = learner.lora.enabled
    state_dict = learner.gathered_adapters() if lora else learner.gathered_state_dict()   # collective under ZeRO-3
    if rank == 0:
        if lora:
            save_adapters(tmp, state_dict, learner.lora)
        else:
            learner.policy.write_pretrained(tmp, state_dict, final_directory=final)
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
    del state_dict
    try:
        save_engine_state(learner, tmp)
    except Exception as e:
        if is_disk_full(e):
            raise
        raise CheckpointError(f"could not write the engine state to {str(tmp)!r} ({type(e).__name__}: {e}); the "
                              f"previous checkpoints are untouched") from e
    dist.barrier()

    if rank == 0:
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                rel = f.relative_to(tmp).as_posix()
                files[rel] = {"size": f.stat().st_size, **({"sha256": sha256_file(f)} if hash_files else {})}
        manifest = {"format": FORMAT, "step": learner.step, "version": learner.version,
                    "world_size": learner.world_size, "zero_stage": learner.config.zero_stage,
                    "bf16": learner.bf16, "transition": learner.algorithm.transition,
                    "family": learner.policy.family, "weights": list(learner.policy.weight_files),
                    "model_config": learner.policy.config_dict(), "param_shapes": _param_shapes(learner),
                    "lora": dataclasses.asdict(learner.config.lora) if lora else None, "files": files}
        atomic_write_json(tmp / MANIFEST, manifest)


def save_checkpoint(learner: "Learner", root: str | Path, keep_last: int = 0, hash_files: bool = True) -> Path:
    """Write ``root/step_NNNNNN`` (all ranks call this). `keep_last` > 0 deletes older complete checkpoints
    beyond that many, after the new one is in place."""
    root = Path(root)
    trainer_state = learner.trainer_state()
    try:
        json.dumps(trainer_state)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the learner's trainer state (incl. driver_state) is not JSON-serialisable: {e}") from e
    name = checkpoint_name(learner.step)
    final, tmp = root / name, root / f".{name}.tmp"
    rank = learner.rank
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)          # left by a crashed save: never a checkpoint
        tmp.mkdir()
    dist.barrier()

    try:
        _write_checkpoint_files(learner, tmp, final, trainer_state, hash_files)
    except Exception as e:
        if rank == 0:
            remove_path(tmp)            # no debris: a full disk stays no fuller than before the attempt
        if is_disk_full(e):
            raise CheckpointError(f"{disk_full_error(tmp, e)}; the previous checkpoints are untouched") from e
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"could not write checkpoint {str(final)!r} ({type(e).__name__}: {e}); the previous "
                              f"checkpoints are untouched") from e

    if rank == 0:
        old = None
        if final.exists():              # re-saving the same step: swap, then drop the old copy
            old = root / f".{name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0:
            for _, p in list_checkpoints(root)[:-keep_last]:
                if p != final:
                    shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    learner.last_checkpoint = str(final)
    return final


def saved_lora(path: str | Path) -> Optional["LoraSettings"]:
    """The LoRA settings a checkpoint was trained with (None: it trained every weight)."""
    path = Path(path)
    return read_settings(path) if _read_manifest(path).get("lora") else None


def lora_mismatch(saved: Optional["LoraSettings"], ours: "LoraSettings", path: str | Path) -> Optional[str]:
    """Why a checkpoint with adapters `saved` cannot resume with `ours` (one line with the fix), or None: a LoRA
    checkpoint resumes only with the same adapters, a full one only without."""
    if saved is None and ours.enabled:
        return (f"checkpoint {str(path)!r} trained every weight (no LoRA adapters) but learner.lora.rank={ours.rank}: "
                f"resume it with learner.lora.rank=0, or start a new LoRA run from its weights "
                f"(policy.init={str(path)!r}, no resume)")
    if saved is not None and not ours.enabled:
        return (f"checkpoint {str(path)!r} holds LoRA adapters (rank {saved.rank}) but learner.lora is off: resume "
                f"with learner.lora.rank={saved.rank} learner.lora.alpha={saved.alpha:g} "
                f"learner.lora.target_modules=[{','.join(saved.target_modules)}] (the run's settings), or merge it "
                f"(maskgrpo export --checkpoint {str(path)!r} --out DIR) and start from DIR")
    if saved is not None and not same_layout(saved, ours):
        return (f"checkpoint {str(path)!r} holds LoRA adapters of rank {saved.rank} (alpha {saved.alpha:g}, modules "
                f"{saved.target_modules}), the learner is set to rank {ours.rank} (alpha {ours.alpha:g}, modules "
                f"{sorted(ours.target_modules)}): resume with the checkpoint's learner.lora settings, or start a new "
                f"run")
    return None


def _check_compatible(learner: "Learner", manifest: dict[str, Any], path: Path) -> None:
    problem = lora_mismatch(read_settings(path) if manifest.get("lora") else None, learner.config.lora, path)
    if problem:
        raise CheckpointError(problem)
    problems = []
    if manifest.get("family", "showo") != learner.policy.family:
        problems.append(f"it holds a {manifest.get('family', 'showo')} policy, the learner a {learner.policy.family} "
                        f"one (policy.family)")
    elif manifest["model_config"] != learner.policy.config_dict():
        problems.append("the model config differs from the learner's policy")
    shapes = _param_shapes(learner)
    if manifest["param_shapes"] != shapes:
        diff = sorted(set(manifest["param_shapes"]) ^ set(shapes)) or \
            sorted(k for k in shapes if manifest["param_shapes"].get(k) != shapes[k])
        problems.append(f"parameter names/shapes differ (e.g. {diff[:3]})")
    if manifest["zero_stage"] != learner.config.zero_stage:
        problems.append(f"saved with ZeRO stage {manifest['zero_stage']}, the learner uses {learner.config.zero_stage}")
    if manifest["zero_stage"] > 0 and manifest["world_size"] != learner.world_size:
        problems.append(f"ZeRO-partitioned state saved by {manifest['world_size']} ranks, loading on "
                        f"{learner.world_size}")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match this learner: " + "; ".join(problems)
                              + ". Use the same model, ZeRO stage and number of ranks (or start from its "
                                "pytorch_model.safetensors with a fresh optimizer)")


def _load_weights(learner: "Learner", path: Path) -> None:
    """The policy's weights from the checkpoint's safetensors file, into every rank's full copy (ZeRO 0-2); with
    LoRA the adapters (the frozen base is the one `policy.init` gave the learner)."""
    from safetensors.torch import load_file
    if learner.lora.enabled:
        load_adapters(learner.policy, read_adapters(path)[1], f"checkpoint {str(path)!r}")
        return
    f = path / learner.policy.weight_files[0]
    try:
        state = load_file(str(f), device="cpu")
    except Exception as e:                  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{str(f)!r} is not a safetensors file ({type(e).__name__}: {e})") from None
    with torch.no_grad():
        load_strict(learner.policy, state, f"checkpoint {str(path)!r}")


def load_checkpoint(learner: "Learner", path: str | Path, check_hash: bool = True) -> Path:
    """Restore `learner` (all ranks call this) from a checkpoint directory, or from the latest complete one
    under a checkpoints root. Raises CheckpointError, before loading anything, for a corrupted or mismatched
    checkpoint."""
    path = Path(path)
    if not (path / MANIFEST).exists() and not _NAME.match(path.name):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no complete learner checkpoint under {str(path)!r}")
        path = found
    error = None
    manifest: dict[str, Any] = {}
    if learner.rank == 0:
        try:
            manifest = verify_checkpoint(path, check_hash)
            check_data_files(path, manifest)
            _check_compatible(learner, manifest, path)
        except CheckpointError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(trainer_state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the trainer state of {str(path)!r}: {type(e).__name__}: {e}") from None
    error = None
    try:
        if learner.config.zero_stage < 3:       # ZeRO-3 restores the weights from the fp32 partitions
            _load_weights(learner, path)
        load_engine_state(learner, path)
        learner.load_trainer_state(trainer_state)
    except CheckpointError as e:
        error = str(e)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        error = (f"the engine state of {str(path)!r} does not fit this learner ({type(e).__name__}: "
                 f"{str(e).splitlines()[0] if str(e) else ''})")
    errors = [e for e in dist.all_gather_object(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0] + "; the learner is left partly loaded: start it again") from None
    learner.last_checkpoint = str(path)
    dist.barrier()
    return path
