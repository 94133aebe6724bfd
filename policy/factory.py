"""Building the policy a process needs (the model, its conditioner, the image decoder) from the `policy` config
section, through the family that `policy.family` names (`policy.family`).

Every process (driver, rollout workers, reward actors, learner ranks) builds its policy through `load_policy`,
so they all agree on architecture, conditioning and decoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

import torch

from worlds.shapes.codebook import ShapesCodebook
from worlds.shapes.world import as_world, world_words

from .family import ImageDecoder, MaskedModel, Policy, family
from .tokenizer import HFTextTokenizer, TextTokenizer, WordTokenizer


class PolicyDtype(StrEnum):
    auto = "auto"           # bf16 on CUDA, fp32 on the CPU
    float32 = "float32"
    bfloat16 = "bfloat16"


class AttentionPrecision(StrEnum):
    model = "model"         # attention in the policy's dtype (fused kernels)
    fp32 = "fp32"           # scores in fp32, as the reference implementation


DTYPES = tuple(d.value for d in PolicyDtype)


class FamilyName(StrEnum):
    showo = "showo"             # Show-o (Phi + MAGVIT-v2), policy/showo.py
    meissonic = "meissonic"     # Meissonic (MMDiT + CLIP text encoder + VQ), policy/meissonic/


class TokenizerKind(StrEnum):
    hf = "hf"           # the family's tokenizer from a directory or Hub id (Show-o: phi-1.5's; Meissonic: CLIP's)
    words = "words"     # an in-process word list (tests, the shapes world)


class DecoderKind(StrEnum):
    magvit = "magvit"   # Show-o: MAGVIT-v2 from a showlab/magvitv2 directory or Hub id
    vqvae = "vqvae"     # Meissonic: diffusers' VQModel from a `vqvae/` directory or Hub id
    shapes = "shapes"   # the shapes world's exact decoder (any family; the run's `world` section)


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.words
    path: Optional[str] = None
    words: list[str] = field(default_factory=list)


@dataclass
class DecoderConfig:
    kind: DecoderKind = DecoderKind.shapes
    path: Optional[str] = None


@dataclass
class PolicyConfig:
    family: FamilyName = FamilyName.showo
    init: str = "random"                # "random", a release dir or Hub id, one of our checkpoints, a .pth state dict
    # the family's architecture (Show-o: `ShowoConfig`; Meissonic: `MeissonicArch`), used for "random" and plain
    # state-dict files; a release or checkpoint directory brings its own (the run's config.yaml records it)
    arch: Any = field(default_factory=dict)
    phi_config: Optional[str] = None    # Show-o: phi-1.5 config.json for a release dir (default: phi-1.5's values)
    max_seq_length: Optional[int] = None
    text_encoder: Optional[str] = None  # Meissonic: the CLIP text encoder's dir or Hub id (None: policy.init's)
    init_seed: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # The ONE place that decides how the policy computes, for rollout workers and learner alike (the learner's
    # bf16 follows it, see `learner_bf16`), so that recorded and recomputed log-probs agree by construction:
    dtype: PolicyDtype = PolicyDtype.auto
    attention_precision: AttentionPrecision = AttentionPrecision.model

    def __post_init__(self) -> None:
        self.family = FamilyName(self.family)
        self.arch = family(self.family).parse_arch(self.arch)


def compute_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """The policy's compute dtype on `device` for a `policy.dtype` value ("auto": bf16 on CUDA, else fp32)."""
    if dtype not in DTYPES:
        raise ValueError(f"policy.dtype must be one of {DTYPES}, not {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def learner_bf16(cfg: PolicyConfig, device: torch.device | str, requested: Optional[bool] = None) -> bool:
    """Whether the learner on `device` trains in bf16: what `policy.dtype` says the rollout workers compute in
    there. A `learner.bf16` set explicitly must agree (a learner that recomputes log-probs in another precision
    than the sampler recorded them turns the clipped objective into noise)."""
    bf16 = compute_dtype(cfg.dtype, device) == torch.bfloat16
    if requested is not None and bool(requested) != bf16:
        raise ValueError(f"learner.bf16={requested} but policy.dtype={cfg.dtype!r} computes in "
                         f"{compute_dtype(cfg.dtype, device)} on {device}: rollout workers and learner must compute "
                         f"log-probs in the same precision; set policy.dtype and leave learner.bf16 unset")
    return bf16


def adapters_only(cfg: PolicyConfig) -> Optional[str]:
    """The error line when `policy.init` is a LoRA checkpoint (adapters, no model weights), else None."""
    init = cfg.init
    path = Path(init).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file() and not family(cfg.family).has_weights(path):
        return (f"policy.init={init!r} holds LoRA adapters, not model weights: merge them into their base with "
                f"`maskgrpo export --checkpoint {init} --out DIR` and use policy.init=DIR (or continue that run "
                f"with resume={init})")
    return None


def build_model(cfg: PolicyConfig) -> MaskedModel:
    """The trained network of `cfg` (fp32, on the CPU)."""
    problem = adapters_only(cfg)
    if problem:
        from .weights import CheckpointError
        raise CheckpointError(problem)
    return family(cfg.family).build_model(cfg)


def build_word_tokenizer(cfg: PolicyConfig, vocab_size: int) -> WordTokenizer:
    """The word-level tokenizer of `policy.tokenizer.words` (a run's config names the words of its world: see
    `cluster.config`), or, when none are named, of every word of the default shapes world's prompts."""
    return WordTokenizer(list(cfg.tokenizer.words) or world_words(as_world()), vocab_size)


def build_tokenizer(cfg: PolicyConfig, vocab_size: int, hf_what: str) -> TextTokenizer:
    """`policy.tokenizer`: a transformers tokenizer (`hf_what` names what the family expects there) or words."""
    tok = cfg.tokenizer
    if tok.kind == TokenizerKind.hf:
        if not tok.path:
            raise ValueError(f"policy.tokenizer.path is required for kind 'hf' ({hf_what})")
        from .hub import resolve_path
        return HFTextTokenizer(resolve_path(tok.path, "policy.tokenizer.path"), hf_what)
    if tok.kind == TokenizerKind.words:
        return build_word_tokenizer(cfg, vocab_size)
    raise ValueError(f"policy.tokenizer.kind must be 'hf' or 'words', not {tok.kind!r}")


def build_decoder(cfg: PolicyConfig, device: torch.device | str = "cpu",
                  world: Optional[dict[str, Any]] = None) -> ImageDecoder:
    """The image decoder `policy.decoder` names: the shapes world's (any family: `world`, the run's `world`
    section as `ShapesWorld` keyword arguments; None: the default world) or the family's own."""
    if cfg.decoder.kind == DecoderKind.shapes:
        return ShapesImageDecoder(ShapesCodebook(**(world or {})))
    return family(cfg.family).build_decoder(cfg, device)


class ShapesImageDecoder:
    """The shapes world's exact decoder for a policy whose codebook may be larger than the world's: codes the world
    does not define decode as empty (background) patches, so they are never detected as objects."""

    def __init__(self, codebook):
        self.codebook = codebook

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.cpu()
        return self.codebook.decode(torch.where(codes < self.codebook.codebook_size, codes, 0))


def load_policy(cfg: PolicyConfig, device: torch.device | str = "cpu", with_decoder: bool = True,
                dtype: Optional[torch.dtype] = None, world: Optional[dict[str, Any]] = None) -> Policy:
    """The policy on `device`, its parameters in `policy.dtype`'s compute dtype there (or `dtype`: a learner keeps
    fp32 master weights and lets its engine cast, see `learner_bf16`); `world`: for a shapes decoder."""
    compute = compute_dtype(cfg.dtype, device)
    model = build_model(cfg).to(device=device, dtype=dtype or compute)
    model.attention_precision = cfg.attention_precision
    conditioner = family(cfg.family).build_conditioner(cfg, model, device, compute)
    decode = build_decoder(cfg, device, world) if with_decoder else _no_decoder
    return Policy(model, conditioner, decode)


def _no_decoder(codes: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this process was built without an image decoder")
