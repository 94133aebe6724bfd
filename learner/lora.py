"""LoRA adapters (peft) on the policy model: adding them, switching them off, their names, their files, merging.

`add_adapters` injects peft's LoRA layers into the policy module itself (`peft.inject_adapter_in_model`, no
`PeftModel` wrapper), so the policy keeps its class and methods (`context`, `logits`, ...) and DeepSpeed wraps
it as before; only the adapter tensors require gradients. Which layers: the family's (`MaskedModel.lora_targets`),
or the subset `learner.lora.target_modules` names. The one change peft makes to the key layout is that an
adapted layer's own weights move under ``.base_layer`` (``...q_proj.weight`` -> ``...q_proj.base_layer.weight``,
next to ``...q_proj.lora_A.default.weight``); `released_name` undoes it, so every export of base or merged weights
(`base_state_dict`, `merged_state_dict`) is in the family's released layout again.

Every process builds the same layout from the same `LoraSettings` (the learner, each rollout worker), with the
adapters' A matrices drawn from a fixed seed, so learner and rollout copies are equal from the start (B = 0: the
adapted model equals the base) and a weight sync only needs to move the adapter tensors.

On disk the adapters are peft's own format: ``adapter_config.json`` + ``adapter_model.safetensors`` with peft's
keys (``base_model.model.<module>.lora_A.weight``), so ``PeftModel.from_pretrained(<the model>, directory)``
opens them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from policy.weights import CheckpointError, save_state_dict

from .config import LoraSettings

ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."     # what PeftModel puts before the wrapped model's module names
INIT_SEED = 0                         # A's initialisation: the same in every process


def peft_config(settings: LoraSettings) -> "peft.LoraConfig":  # noqa: F821
    from peft import LoraConfig
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none")


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, peft LoRA layer) of every adapted layer, in module order."""
    from peft.tuners.lora import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name (ours, peft-style or peft's file key) is a LoRA tensor."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' (name, parameter) pairs in `named_parameters` order: what trains and what a sync moves."""
    return [(n, p) for n, p in model.named_parameters() if is_adapter_name(n)]


def released_name(name: str) -> str:
    """The released key of a base tensor of an adapted model (``.base_layer.`` removed)."""
    return name.replace(".base_layer.", ".")


def resolve_targets(settings: LoraSettings, model: nn.Module) -> LoraSettings:
    """`settings` with its target modules explicit: the model family's when none are named; names the family does
    not adapt are refused (a `policy.family.MaskedModel` says which it adapts; another module: any linear layer)."""
    targets = getattr(model, "lora_targets", None)
    if targets is None:
        return settings
    problem = settings.target_problem(getattr(model, "family", type(model).__name__), tuple(targets),
                                      getattr(model, "lora_note", ""))
    if problem:
        raise ValueError(problem)
    return settings if settings.target_modules else dataclasses.replace(settings, target_modules=list(targets))


def add_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers into `model` in place (see module doc) and freeze everything but the adapters."""
    if not settings.enabled:
        raise ValueError("add_adapters needs learner.lora.rank >= 1")
    if has_adapters(model):
        raise ValueError("the model already has LoRA adapters")
    settings = resolve_targets(settings, model)
    if not settings.target_modules:
        raise ValueError("learner.lora.target_modules is empty and the model names no layers to adapt")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # peft's rule: a target names a module by its full name or a suffix of whole components ("to_out.0")
    missing = [t for t in settings.target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
    present = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if missing:
        raise ValueError(f"learner.lora.target_modules {missing} match no linear layer of this model (it has "
                         f"{present}): remove them or pick from those")
    from peft import inject_adapter_in_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        inject_adapter_in_model(peft_config(settings), model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name))
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` computing as its base (the KL reference with LoRA: no second copy of the weights)."""
    layers = [m for _, m in lora_layers(model)]
    grads = [p.requires_grad for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, g in zip((p for m in layers for p in m.parameters()), grads):
            p.requires_grad_(g)      # peft's enable re-marks adapters trainable; keep what the caller had


def read_settings(directory: str | Path) -> LoraSettings:
    """The LoRA settings of a peft adapter directory (its adapter_config.json)."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        d = json.loads(path.read_text())
        return LoraSettings(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                            target_modules=sorted(d["target_modules"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the LoRA settings in {str(path)!r} ({type(e).__name__}: {e}): the "
                              f"adapter directory is damaged or was not written by peft/maskgrpo") from e


def same_layout(a: LoraSettings, b: LoraSettings) -> bool:
    """Whether two settings give the same adapter tensors and the same function (dropout only trains)."""
    return a.rank == b.rank and a.alpha == b.alpha and sorted(a.target_modules) == sorted(b.target_modules)


def to_peft_keys(adapters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names (``x.lora_A.default.weight``) -> peft's file keys (``base_model.model.x.lora_A.weight``)."""
    return {PEFT_PREFIX + n.replace(f".{ADAPTER_NAME}.", "."): t for n, t in adapters.items()}


def from_peft_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in (".lora_A.", ".lora_B."):
            name = name.replace(part, f"{part}{ADAPTER_NAME}.")
        out[name] = t
    return out


def save_adapters(directory: str | Path, adapters: Mapping[str, torch.Tensor], settings: LoraSettings) -> None:
    """Write peft's adapter files into `directory` (our names in, peft's keys on disk)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config(settings).save_pretrained(str(directory))
    save_state_dict(to_peft_keys(adapters), directory / ADAPTER_WEIGHTS)


def read_adapters(directory: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """(settings, adapter tensors under our parameter names) of a peft adapter directory."""
    directory = Path(directory)
    settings = read_settings(directory)
    f = directory / ADAPTER_WEIGHTS
    try:
        from safetensors.torch import load_file
        tensors = load_file(str(f), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read the LoRA adapters {str(f)!r} ({type(e).__name__}: {e}): the file is "
                              f"missing or damaged") from e
    return settings, from_peft_keys(tensors)


@torch.no_grad()
def load_adapters(model: nn.Module, adapters: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy adapter tensors into an adapted `model`; every adapter of the model must be given, with its shape."""
    own = dict(adapter_parameters(model))
    missing, unexpected = sorted(set(own) - set(adapters)), sorted(set(adapters) - set(own))
    wrong = sorted(n for n in set(own) & set(adapters) if tuple(own[n].shape) != tuple(adapters[n].shape))
    if missing or unexpected or wrong:
        e = (missing or unexpected or wrong)[:3]
        raise CheckpointError(f"{what}: its LoRA adapters do not fit this model ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. {e}): use the "
                              f"learner.lora settings and the policy the adapters were trained with")
    for n, p in own.items():
        p.copy_(adapters[n])


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights (adapters left out) in the released layout."""
    return {released_name(k): v for k, v in model.state_dict().items() if not is_adapter_name(k)}


def merge_state_dict(state: Mapping[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """An adapted model's full state dict (our parameter names, e.g. gathered from all ranks) as plain weights in
    the released layout: each adapted layer's W + (alpha/rank)·B·A, computed in fp32 (fp32 CPU out)."""
    out = {released_name(k): v.detach().float().cpu().clone() for k, v in state.items() if not is_adapter_name(k)}
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    scale = settings.alpha / settings.rank
    for key, a in state.items():
        if key.endswith(suffix):
            module = key[:-len(suffix)]
            b = state[f"{module}.lora_B.{ADAPTER_NAME}.weight"]
            out[f"{module}.weight"] += (b.detach().float().cpu() @ a.detach().float().cpu()) * scale
    return out


def merged_state_dict(model: nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """`merge_state_dict` of an adapted model held in this process."""
    return merge_state_dict(model.state_dict(), settings)
