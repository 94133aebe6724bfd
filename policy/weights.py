"""Reading, strictly loading and saving checkpoints in a released key layout.

One place for every loader in the project (Show-o, MAGVIT-v2, reward models) so that a wrong path, a
corrupted file or a mismatched tensor always produces the same kind of clear error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .files import atomic_write

# In order of preference: Show-o's own ModelMixin names (pytorch_model.*), transformers', diffusers'.
WEIGHT_FILE_NAMES = ("pytorch_model.safetensors", "model.safetensors", "pytorch_model.bin",
                     "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or matched to the model; the message says what to fix."""


def find_weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint given as a file or as a release directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist: set the config's path to a local copy "
                              f"of the release (no weights are downloaded at run time)")
    if p.is_file():
        return [p]
    for name in WEIGHT_FILE_NAMES:
        if (p / name).is_file():
            return [p / name]
    shards = sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model-*.bin"))
    if shards:
        return shards
    raise CheckpointError(f"no weights in directory {str(p)!r}: expected one of {', '.join(WEIGHT_FILE_NAMES)} "
                          f"or sharded *.safetensors / pytorch_model-*.bin files")


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (file or directory), on the CPU.

    `key` picks a nested dict (e.g. HPSv2's ``state_dict``); a plain state dict is returned as is.
    """
    tensors: dict[str, torch.Tensor] = {}
    for f in find_weight_files(path):
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file
                part = load_file(str(f), device="cpu")
            else:
                part = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # corrupted / truncated / not a checkpoint
            raise CheckpointError(f"cannot read checkpoint file {str(f)!r} ({type(e).__name__}: {e}); "
                                  f"the file is corrupted or not a PyTorch/safetensors checkpoint: "
                                  f"download it again") from e
        if key is not None:
            if not isinstance(part, Mapping) or key not in part:
                raise CheckpointError(f"checkpoint {str(f)!r} has no entry {key!r}")
            part = part[key]
        elif isinstance(part, Mapping) and "state_dict" in part and isinstance(part["state_dict"], Mapping) \
                and not any(isinstance(v, torch.Tensor) for v in part.values()):
            part = part["state_dict"]
        if not isinstance(part, Mapping):
            raise CheckpointError(f"checkpoint {str(f)!r} holds a {type(part).__name__}, not a state dict")
        tensors.update(part)
    return tensors


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                ignore: tuple[str, ...] = ()) -> None:
    """Copy `state_dict` into `module`, refusing any missing, unexpected or mis-shaped tensor.

    `ignore` lists key prefixes/suffixes that may be present in the file but are not parameters
    (e.g. non-persistent buffers of older releases).
    """
    own = module.state_dict()
    sd = {k: v for k, v in state_dict.items() if not any(k.startswith(i) or k.endswith(i) for i in ignore)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        lines = [f"{what}: the checkpoint does not match the model built from the config"]
        if missing:
            lines.append(f"  missing {len(missing)} tensors, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} tensors, e.g. {unexpected[:5]}")
        for k in wrong[:5]:
            lines.append(f"  {k}: checkpoint shape {tuple(sd[k].shape)} != model shape {tuple(own[k].shape)}")
        lines.append("  fix: point the config at the checkpoint that belongs to this model configuration "
                     "(e.g. show-o-512x512 needs num_vq_tokens=1024), or the config at the checkpoint's config.json")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(sd, strict=True)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict atomically (temporary name, then rename) as safetensors or torch pickle by suffix.
    Safetensors files carry ``{"format": "pt"}`` metadata, as transformers' and diffusers' savers write."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, str(tmp)))
