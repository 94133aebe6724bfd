"""Loading open_clip models strictly from a local checkpoint, plus shared device/dtype helpers.

No weights are downloaded: the architecture comes from open_clip's bundled configs (``arch``, e.g. "ViT-H-14") or
from a model-config JSON (``model_config``), and the weights from ``path`` via ``policy.weights`` (strict: a
missing, unexpected or mis-shaped tensor raises CheckpointError). The tokenizer is open_clip's bundled BPE
(``open_clip.get_tokenizer(arch)``), which needs no network for OpenAI-style CLIP text towers.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from policy.device import resolve_device
from policy.weights import CheckpointError, load_strict, read_state_dict
from rewards.preprocess import OPENAI_MEAN, OPENAI_STD

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: Optional[str | torch.dtype], device: torch.device) -> torch.dtype:
    """``None``/"auto" -> float16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def require_path(path: Optional[str], what: str, expected: str) -> Path:
    """Fail early and clearly when a reward's checkpoint is not configured or not on disk."""
    if not path:
        raise CheckpointError(f"{what}: no checkpoint path configured; expected {expected}")
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what}: checkpoint {str(p)!r} not found; expected {expected} "
                              f"(no weights are downloaded at run time)")
    return p


def _register_model_config(model_config: str | dict[str, Any], arch: Optional[str]) -> str:
    import open_clip
    from open_clip import factory
    if isinstance(model_config, dict):   # registered under a name derived from its content, never a bundled one
        blob = json.dumps(model_config, sort_keys=True)
        name = f"custom-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"
        factory._MODEL_CONFIGS[name] = json.loads(blob)
        return name
    p = Path(model_config)
    if not p.is_file():
        raise CheckpointError(f"open_clip model config {str(p)!r} not found")
    cfg = json.loads(p.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise CheckpointError(f"{str(p)!r} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    open_clip.add_model_config(p)
    return p.stem


def create_open_clip(arch: str, quick_gelu: bool = False) -> nn.Module:
    """A randomly initialised open_clip model of `arch` on the CPU (silencing open_clip's "no pretrained" warning)."""
    import open_clip
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, pretrained_text=False,
                                      pretrained_image=False, device="cpu")
    finally:
        logging.disable(previous)


def load_open_clip(arch: Optional[str], path: str, what: str, *, expected: str = "an open_clip state dict",
                   key: Optional[str] = None, model_config: str | dict | None = None, quick_gelu: bool = False,
                   device: Optional[str | torch.device] = None,
                   dtype: Optional[str | torch.dtype] = None) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """Build open_clip `arch` (or the config in `model_config`), load `path` strictly, return (model, tokenizer).

    `quick_gelu` must be True for OpenAI's original CLIP weights (the state dict cannot tell: loading them into a
    GELU model gives wrong embeddings silently). `key` picks a nested state dict (HPSv2: "state_dict").
    """
    import open_clip
    p = require_path(path, what, expected)
    if model_config is not None:
        arch = _register_model_config(model_config, arch)
    if not arch or arch not in open_clip.list_models():
        raise ValueError(f"{what}: unknown open_clip architecture {arch!r}; give a bundled name such as "
                         f"'ViT-H-14' / 'ViT-L-14' or a model_config JSON")
    model = create_open_clip(arch, quick_gelu)
    sd = read_state_dict(p, key=key)
    if sd and next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    load_strict(model, sd, what, ignore=("position_ids",))
    dev = resolve_device(device)
    model = model.to(dev, resolve_dtype(dtype, dev)).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(arch)


def open_clip_image_cfg(model: nn.Module) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """(image size, mean, std) the model was trained with (OpenAI mean/std unless its config says otherwise)."""
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or OPENAI_STD)
    return size, mean, std


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_text(model: nn.Module, tokenizer: Callable, texts: list[str]) -> torch.Tensor:
    """L2-normalised open_clip text embeddings [N, D] (float32)."""
    device, _ = model_device_dtype(model)
    tokens = tokenizer(texts).to(device)
    return nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def encode_image(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised open_clip image embeddings [B, D] (float32) from preprocessed pixels."""
    device, dtype = model_device_dtype(model)
    return nn.functional.normalize(model.encode_image(pixels.to(device, dtype)).float(), dim=-1)


def load_hf_pretrained(model_cls: Any, path: str, what: str, expected: str) -> nn.Module:
    """``model_cls.from_pretrained(path)`` offline, refusing any missing, unexpected or mis-shaped tensor.

    transformers' own loader is used (not ``policy.weights``) because transformers 5 renames some architectures'
    keys between the released files and the modules (e.g. Swin inside Mask2Former); its loading report is made
    strict here. Old non-persistent buffers such as ``position_ids`` are ignored by transformers itself.
    """
    p = require_path(path, what, expected)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{what}: {str(p)!r} has no config.json; expected {expected}")
    try:
        model, info = model_cls.from_pretrained(str(p), local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise CheckpointError(f"{what}: cannot load {str(p)!r} ({type(e).__name__}: {e}); expected {expected}") from e
    problems = [f"{k.replace('_', ' ')}: {sorted(map(str, v))[:5]}" for k, v in info.items() if v]
    if problems:
        raise CheckpointError(f"{what}: the checkpoint in {str(p)!r} does not match its config "
                              f"({'; '.join(problems)}); expected {expected}")
    return model
