"""`maskgrpo export`: a LoRA training checkpoint merged into plain weights (the policy family's released layout).

The checkpoint holds only the adapters (peft's files) and the optimizer state; the frozen base is the run's
``policy.init``. The export builds that base from the run's config, adds the checkpoint's adapters, and writes each
adapted layer's W + (alpha/rank)·B·A in the family's layout (`MaskedModel.write_pretrained`; Show-o:
``pytorch_model.safetensors`` + ``config.json``), which the authors' loader and our ``policy.init`` (and
``maskgrpo eval --checkpoint``) open.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from learner.checkpoint import verify_checkpoint
from learner.lora import add_adapters, load_adapters, merged_state_dict, read_adapters
from policy.factory import build_model
from policy.weights import CheckpointError

from .config import ConfigError, load_config, section


def run_config_of(checkpoint: Path) -> Path:
    """The run config saved beside a training checkpoint (``<output_dir>/config.yaml`` for
    ``<output_dir>/checkpoints/step_N``)."""
    return checkpoint.resolve().parent.parent / "config.yaml"


def export_merged(cfg: Optional[DictConfig], checkpoint: str | Path, out: str | Path) -> Path:
    """Merge `checkpoint`'s adapters into the base of `cfg` (default: the run config saved beside the checkpoint)
    and write the result to `out` (a new directory). Returns `out`."""
    ck, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if not ck.is_dir():
        raise ConfigError(f"--checkpoint {str(ck)!r} is not a directory: give a training checkpoint such as "
                          f"runs/x/checkpoints/step_000150")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not empty: give a new directory")
    manifest = verify_checkpoint(ck)
    if not manifest.get("lora"):
        raise ConfigError(f"{str(ck)!r} holds full weights already (no LoRA adapters): use it as policy.init or "
                          f"`maskgrpo eval --checkpoint` directly, no export needed")
    if cfg is None:
        saved = run_config_of(ck)
        if not saved.is_file():
            raise ConfigError(f"no run config at {str(saved)!r} to find the base model: give the run's config with "
                              f"--config (its policy.init is the base the adapters were trained on)")
        cfg = load_config(saved)
    policy = section(cfg, "policy")
    if policy.init == "pretrained":
        from .pretrain import base_dir
        policy.init = str(base_dir(cfg))
    if policy.init != "random" and not Path(policy.init).expanduser().exists():   # random: rebuilt from init_seed
        raise ConfigError(f"policy.init={policy.init!r} does not exist: give the run's config (--config "
                          f"runs/x/config.yaml) or policy.init=<the base the adapters were trained on>")
    model = build_model(policy).float()
    if model.family != manifest.get("family", "showo") or model.config_dict() != manifest["model_config"]:
        raise CheckpointError(f"the base at policy.init={policy.init!r} is another model than the one {str(ck)!r} "
                              f"was trained on: give the run's own config or policy.init")
    settings, adapters = read_adapters(ck)
    add_adapters(model, settings)
    load_adapters(model, adapters, what=f"checkpoint {str(ck)!r}")
    merged = merged_state_dict(model, settings)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.write_pretrained(tmp, {k: v.to(torch.float32) for k, v in merged.items()}, final_directory=out)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
