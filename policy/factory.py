"""Building the policy a process needs (Show-o, text tokenizer, image decoder) from the `policy` config section.

Every process (driver, rollout workers, reward actors, learner ranks) builds its policy through `load_policy`,
so they all agree on architecture, token layout and decoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from worlds.shapes.codebook import ShapesCodebook
from worlds.shapes.world import all_prompts, as_world

from .showo import Showo, ShowoConfig, has_pretrained_weights
from .tokenizer import HFTextTokenizer, TextTokenizer, WordTokenizer

ImageDecoder = Callable[[torch.Tensor], torch.Tensor]   # codes long [B, N] -> uint8 [B, H, W, 3]


class PolicyDtype(StrEnum):
    auto = "auto"           # bf16 on CUDA, fp32 on the CPU
    float32 = "float32"
    bfloat16 = "bfloat16"


class AttentionPrecision(StrEnum):
    model = "model"         # attention in the policy's dtype (fused kernels)
    fp32 = "fp32"           # scores in fp32, as the reference implementation


DTYPES = tuple(d.value for d in PolicyDtype)


class TokenizerKind(StrEnum):
    hf = "hf"           # the phi-1.5 tokenizer from a local directory
    words = "words"     # an in-process word list (tests, the shapes world)


class DecoderKind(StrEnum):
    magvit = "magvit"   # MAGVIT-v2 from a local showlab/magvitv2 directory
    shapes = "shapes"   # the shapes world's exact decoder


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.words
    path: Optional[str] = None
    words: list[str] = field(default_factory=list)


@dataclass
class DecoderConfig:
    kind: DecoderKind = DecoderKind.shapes
    path: Optional[str] = None
    shapes: dict[str, Any] = field(default_factory=dict)   # ShapesWorld keyword arguments


@dataclass
class PolicyConfig:
    init: str = "random"                # "random", a Show-o release dir, one of our checkpoints, or a .pth state dict
    arch: ShowoConfig = field(default_factory=ShowoConfig)   # used for "random" and plain state-dict files
    phi_config: Optional[str] = None    # phi-1.5 config.json for a release dir (default: phi-1.5's values)
    max_seq_length: Optional[int] = None
    init_seed: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # The ONE place that decides how the policy computes, for rollout workers and learner alike (the learner's
    # bf16 follows it, see `learner_bf16`), so that recorded and recomputed log-probs agree by construction:
    dtype: PolicyDtype = PolicyDtype.auto
    attention_precision: AttentionPrecision = AttentionPrecision.model


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


def adapters_only(init: str) -> Optional[str]:
    """The error line when `policy.init` is a LoRA checkpoint (adapters, no model weights), else None."""
    path = Path(init).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file() and not has_pretrained_weights(path):
        return (f"policy.init={init!r} holds LoRA adapters, not model weights: merge them into their base with "
                f"`maskgrpo export --checkpoint {init} --out DIR` and use policy.init=DIR (or continue that run "
                f"with resume={init})")
    return None


def build_showo(cfg: PolicyConfig) -> Showo:
    if cfg.init == "random":
        torch.manual_seed(cfg.init_seed)
        return Showo(cfg.arch)
    path = Path(cfg.init).expanduser()
    problem = adapters_only(cfg.init)
    if problem:
        from .weights import CheckpointError
        raise CheckpointError(problem)
    has_config = path.is_dir() and (path / "config.json").is_file()
    return Showo.from_pretrained(path, config=None if has_config else cfg.arch, phi_config=cfg.phi_config,
                                 max_seq_length=cfg.max_seq_length)


def build_tokenizer(cfg: PolicyConfig, llm_vocab_size: int) -> TextTokenizer:
    tok = cfg.tokenizer
    if tok.kind == TokenizerKind.hf:
        if not tok.path:
            raise ValueError("policy.tokenizer.path is required for kind 'hf' (a local microsoft/phi-1_5 copy)")
        return HFTextTokenizer(tok.path)
    if tok.kind == TokenizerKind.words:
        words = list(tok.words)
        if not words:
            items = all_prompts(as_world(**cfg.decoder.shapes))
            words = sorted({w for item in items for w in item.prompt.lower().split()})
        return WordTokenizer(words, llm_vocab_size)
    raise ValueError(f"policy.tokenizer.kind must be 'hf' or 'words', not {tok.kind!r}")


def build_decoder(cfg: PolicyConfig, device: torch.device | str = "cpu") -> ImageDecoder:
    dec = cfg.decoder
    if dec.kind == DecoderKind.magvit:
        from .magvit import MagvitV2
        if not dec.path:
            raise ValueError("policy.decoder.path is required for kind 'magvit' (a local showlab/magvitv2 copy)")
        vq = MagvitV2.from_pretrained(dec.path, device=device)
        return vq.decode_uint8
    if dec.kind == DecoderKind.shapes:
        return ShapesImageDecoder(ShapesCodebook(**dec.shapes))
    raise ValueError(f"policy.decoder.kind must be 'magvit' or 'shapes', not {dec.kind!r}")


class ShapesImageDecoder:
    """The shapes world's exact decoder for a policy whose codebook may be larger than the world's: codes the world
    does not define decode as empty (background) patches, so they are never detected as objects."""

    def __init__(self, codebook):
        self.codebook = codebook

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.cpu()
        return self.codebook.decode(torch.where(codes < self.codebook.codebook_size, codes, 0))


@dataclass
class Policy:
    model: Showo
    tokenizer: TextTokenizer
    decode: ImageDecoder

    def text_areas(self, prompts: list[str]) -> torch.Tensor:
        return self.model.layout.text_area(self.tokenizer(prompts))


def load_policy(cfg: PolicyConfig, device: torch.device | str = "cpu", with_decoder: bool = True,
                dtype: Optional[torch.dtype] = None) -> Policy:
    """The policy on `device`, its parameters in `policy.dtype`'s compute dtype there (or `dtype`: a learner keeps
    fp32 master weights and lets its engine cast, see `learner_bf16`)."""
    model = build_showo(cfg).to(device=device, dtype=dtype or compute_dtype(cfg.dtype, device))
    model.attention_precision = cfg.attention_precision
    tokenizer = build_tokenizer(cfg, model.layout.llm_vocab_size)
    decode = build_decoder(cfg, device) if with_decoder else _no_decoder
    return Policy(model, tokenizer, decode)


def _no_decoder(codes: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this process was built without an image decoder")
