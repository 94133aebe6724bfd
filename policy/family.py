"""The policy interface: what a masked text-to-image model gives the rest of the system, and the registry of families.

Everything outside `policy/` (learner, actors, cluster, rewards) reaches a model through this module only; a new
family is one module that subclasses `MaskedModel` (the trained network) and `PolicyFamily` (how to build, load,
save and check it), named in `FAMILIES`. `policy.family` in the config picks it (`showo` by default).

What crosses process boundaries is data: a **condition** (`Condition`: a dict of tensors whose first dimension is
the row, e.g. Show-o's t2i text area ``{"ids": long [B, L]}``, Meissonic's text embeddings ``{"pooled", "hidden"}``)
and image codes (long [B, N], -1 where masked). The model turns conditions into a per-batch **context** (Show-o:
the text prefix's keys/values, reused by every step; Meissonic: the embeddings themselves) and a context plus codes
into codebook logits at one unmasking step.

Guidance is written one way for every family, as a weight w on the logits: ``(1 + w)·cond − w·uncond``; each family
maps its own scale to w (Show-o: w = s; Meissonic, whose pipeline computes ``uncond + s·(cond − uncond)``: w = s − 1,
guidance off for s <= 1), and trajectories record w.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import nn

Condition = dict[str, torch.Tensor]
ImageDecoder = Callable[[torch.Tensor], torch.Tensor]   # codes long [B, N] -> uint8 [B, H, W, 3]

# family name -> "module:attribute" of its `PolicyFamily` (imported on first use: a Show-o run never imports
# diffusers)
FAMILIES: dict[str, str] = {
    "showo": "policy.showo_family:SHOWO",
    "meissonic": "policy.meissonic.family:MEISSONIC",
}


# ----- conditions ------------------------------------------------------------------------------------------------
def condition_rows(cond: Condition) -> int:
    return int(next(iter(cond.values())).shape[0]) if cond else 0


def select_rows(cond: Condition, index: torch.Tensor | slice) -> Condition:
    return {k: v[index] for k, v in cond.items()}


def repeat_each(t: torch.Tensor, repeats: "int | torch.Tensor") -> torch.Tensor:
    """Each row of `t` `repeats` times in a row: an int for all, or a host tensor of per-row counts (moved to
    `t`'s device with the output size known on the host: no device read)."""
    if isinstance(repeats, int):
        return t if repeats == 1 else t.repeat_interleave(repeats, 0)
    return t.repeat_interleave(repeats.to(t.device), 0, output_size=int(repeats.sum()))


def repeat_rows(cond: Condition, repeats: "int | torch.Tensor") -> Condition:
    """Each row `repeats` times in a row (the G samples of a prompt, or a sample's trained steps)."""
    return {k: repeat_each(v, repeats) for k, v in cond.items()}


def concat_rows(conds: Sequence[Condition]) -> Condition:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def condition_to(cond: Condition, device: torch.device | str) -> Condition:
    return {k: v.to(device) for k, v in cond.items()}


def where_rows(mask: torch.Tensor, a: Condition, b: Condition) -> Condition:
    """Row i of `a` where mask[i], else row i of `b` (either may have one row, broadcast to all)."""
    return {k: torch.where(mask.view(-1, *([1] * (v.dim() - 1))), v, b[k]) for k, v in a.items()}


# ----- the trained network ------------------------------------------------------------------------------------------
class MaskedModel(nn.Module):
    """The network a family trains (its parameter names are the release's), and what the sampler and learner ask
    of it. Subclasses set `family`, `weight_files` and implement the methods below."""

    family: ClassVar[str]
    # the trained network's files in a checkpoint directory (its released layout), relative paths
    weight_files: ClassVar[tuple[str, ...]]
    lora_targets: ClassVar[tuple[str, ...]]        # module names peft LoRA adapts (learner.lora.target_modules)
    lora_note: ClassVar[str] = ""                  # why some linear layers are not targets (for the error message)
    gradient_checkpointing: bool = False
    attention_precision: str = "model"             # "fp32": attention scores in fp32 where a family supports it
    schedule_precision: ClassVar[str] = "float64"  # the arithmetic of the mask schedule N·γ(r) (`sampler.masked_counts`)

    # ----- the token grid -------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Image-code positions N per sample."""
        raise NotImplementedError

    @property
    def codebook_size(self) -> int:
        raise NotImplementedError

    # ----- context and logits -----------------------------------------------------------------------------------
    def context(self, parts: Sequence[tuple[Condition, int]], inference: bool, reuse: bool = True) -> Any:
        """The per-batch context of the rows ``parts`` stack: each (condition, repeats) part gives each of its rows
        `repeats` times in a row. `inference`: no gradients will flow (the sampler may preallocate caches);
        `reuse`: whether to reuse what the condition alone determines (Show-o's text prefix) across steps."""
        raise NotImplementedError

    def logits(self, context: Any, codes: torch.Tensor, steps: torch.Tensor | int, num_steps: int) -> torch.Tensor:
        """Codebook logits [R, N, C] (the model's dtype) for codes long [R, N] (-1 = masked) at unmasking step
        `steps` (one per row, or one for all; fractional in pretraining) of a `num_steps`-step schedule."""
        raise NotImplementedError

    # ----- the unmasking rule -------------------------------------------------------------------------------------
    @staticmethod
    def guidance_weight(scale: float) -> float:
        """w of ``(1 + w)·cond − w·uncond`` for this family's guidance scale (0: guidance off)."""
        raise NotImplementedError

    @staticmethod
    def remask_temperature(temperature: float, step: int, num_steps: int) -> float:
        """The Gumbel temperature on the re-masking confidence at `step` (annealed to 0 by the family's rule)."""
        raise NotImplementedError

    # ----- training -----------------------------------------------------------------------------------------------
    def zero3_external_parameters(self) -> list[nn.Parameter]:
        """Parameters read outside their module's forward (ZeRO-3 must gather them for the whole forward)."""
        return []

    def activation_bytes_per_row(self, checkpointing: bool) -> float:
        """An estimate of one trained (sample, step) row's activation memory in bf16 (`learner.memory`)."""
        raise NotImplementedError

    def padding_condition(self) -> Condition:
        """A valid one-row condition (for zero-weight passes that keep collective counts equal across ranks)."""
        raise NotImplementedError

    # ----- its released layout --------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The architecture as plain JSON values (checkpoint manifests compare it)."""
        raise NotImplementedError

    def write_pretrained(self, directory: str | Path, state_dict: Optional[dict[str, torch.Tensor]] = None,
                         final_directory: str | Path | None = None) -> list[Path]:
        """Write this model (or `state_dict`, our parameter names) in the release's layout; returns the files."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> None:
        self.write_pretrained(directory)


# ----- conditioning: prompts -> conditions ----------------------------------------------------------------------------
class Conditioner:
    """Prompts to conditions on a device (a family's tokenizer, and text encoder where it has one)."""

    def __call__(self, prompts: Sequence[str]) -> Condition:
        raise NotImplementedError

    def null(self, negative_prompt: str = "") -> Condition:
        """The one-row condition that guidance contrasts with: the null prompt, or `negative_prompt`."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> None:
        """Write what the conditioner holds beside the model in the family's layout (nothing for most)."""


@dataclass
class Policy:
    """What a process that samples holds: the model, its conditioner and (where it decodes) the image decoder."""
    model: MaskedModel
    conditioner: Conditioner
    decode: ImageDecoder

    def condition(self, prompts: Sequence[str]) -> Condition:
        return self.conditioner(prompts)

    def null_condition(self, negative_prompt: str = "") -> Condition:
        return self.conditioner.null(negative_prompt)


# ----- the family: building, loading and checking ------------------------------------------------------------------------
class PolicyFamily:
    """How one family's models are built from the `policy` config section, loaded and checked."""

    name: str
    arch_class: type                                 # the dataclass `policy.arch` is read into
    model_class: type[MaskedModel]                   # the trained network's class (its static facts: files, LoRA)

    def parse_arch(self, values: Any) -> Any:
        """`policy.arch` (a dict from the config, or the dataclass already) as the family's architecture."""
        if isinstance(values, self.arch_class):
            return values
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
        try:   # typed and checked like every config section: a misspelt key or a wrong type names the key
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(self.arch_class), dict(values or {})))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise ValueError(f"policy.arch{f'.{key}' if key else ''}: {str(getattr(e, 'msg', None) or e).splitlines()[0]} "
                             f"(the keys of {self.name}'s architecture are those of {self.arch_class.__name__})") from None

    def build_model(self, cfg: Any) -> MaskedModel:
        """The trained network of `cfg.init` (random weights from `cfg.arch`, a release, one of our checkpoints)."""
        raise NotImplementedError

    def build_conditioner(self, cfg: Any, model: MaskedModel, device: torch.device | str,
                          dtype: torch.dtype) -> Conditioner:
        """Prompts -> conditions for `model` (whose layout it must match), computing on `device` in `dtype`."""
        raise NotImplementedError

    def build_decoder(self, cfg: Any, device: torch.device | str = "cpu") -> ImageDecoder:
        raise NotImplementedError

    def arch_from_directory(self, path: Path, cfg: Any) -> Optional[tuple[Any, str]]:
        """The architecture a release or checkpoint directory says, and a short description of it (None when it
        holds no config of this family)."""
        raise NotImplementedError

    def config_problems(self, cfg: Any) -> list[str]:
        """What is wrong with the `policy` section for this family (paths that do not exist, kinds it lacks)."""
        return []

    def prompt_token_counts(self, cfg: Any, prompts: Sequence[str]) -> tuple[list[int], int, str]:
        """How many tokens each prompt takes, how many the model reads (longer ones are cut) and what sets that
        (for the message, e.g. "policy.arch.max_seq_length=16 tokens")."""
        raise NotImplementedError

    def rollout_bytes_per_sample(self, arch: Any, steps: int, guided: bool) -> int:
        """An estimate, from below, of one rollout sample's memory while it is sampled (`cluster.preflight`)."""
        raise NotImplementedError

    def has_weights(self, directory: Path) -> bool:
        """Whether `directory` holds this family's model weights (not only LoRA adapters)."""
        raise NotImplementedError

    def component_paths(self, cfg: Any, init: Path) -> dict[str, str]:
        """`policy` keys (dotted) the config leaves unset whose component lives in the `policy.init` directory
        `init`, with that folder: the run's config then names them (none for most families)."""
        return {}


def family(name: str) -> PolicyFamily:
    """The registered family `name` (`policy.family`)."""
    if name not in FAMILIES:
        raise ValueError(f"policy.family={name!r} is not a known family; choose one of {sorted(FAMILIES)}")
    module, attr = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), attr)
