"""Show-o as a policy family (`policy.family: showo`): Phi with the extended vocabulary (`policy.showo`), phi-1.5's
tokenizer or a word list, MAGVIT-v2 (`policy.magvit`) or the shapes world's decoder.

Its condition is the t2i text area ``{"ids": long [B, max_seq_length + 1]}`` (`policy.layout`); the null condition
is the empty prompt's (or `sampler.negative_prompt`'s) text area, as Show-o's classifier-free guidance.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .family import Condition, Conditioner, ImageDecoder, PolicyFamily
from .hub import is_hub_id, resolve_path
from .layout import TokenLayout
from .showo import Showo, ShowoConfig, has_pretrained_weights
from .tokenizer import TextTokenizer

PHI_TOKENIZER = "the phi-1.5 tokenizer (microsoft/phi-1_5: tokenizer.json / vocab.json + merges.txt)"


class ShowoConditioner(Conditioner):
    """Prompts -> t2i text areas (CPU tensors: the sampler moves them to its device)."""

    def __init__(self, tokenizer: TextTokenizer, layout: TokenLayout):
        self.tokenizer, self.layout = tokenizer, layout

    def __call__(self, prompts: Sequence[str]) -> Condition:
        return {"ids": self.layout.text_area(self.tokenizer(list(prompts)))}

    def null(self, negative_prompt: str = "") -> Condition:
        if negative_prompt:
            return self([negative_prompt])
        return {"ids": self.layout.empty_text_area(1)}



class ShowoFamily(PolicyFamily):
    name = "showo"
    arch_class = ShowoConfig
    model_class = Showo

    def build_model(self, cfg: Any) -> Showo:
        if cfg.init == "random":
            torch.manual_seed(cfg.init_seed)
            return Showo(cfg.arch)
        path = resolve_path(cfg.init, "policy.init")
        has_config = path.is_dir() and (path / "config.json").is_file()
        return Showo.from_pretrained(path, config=None if has_config else cfg.arch, phi_config=cfg.phi_config,
                                     max_seq_length=cfg.max_seq_length)

    def build_conditioner(self, cfg: Any, model: Showo, device: torch.device | str,
                          dtype: torch.dtype) -> ShowoConditioner:
        from .factory import build_tokenizer
        layout = model.layout
        return ShowoConditioner(build_tokenizer(cfg, layout.llm_vocab_size, PHI_TOKENIZER), layout)

    def build_decoder(self, cfg: Any, device: torch.device | str = "cpu") -> ImageDecoder:
        from .factory import DecoderKind
        if cfg.decoder.kind != DecoderKind.magvit:
            raise ValueError(f"policy.decoder.kind={cfg.decoder.kind!r}: Show-o decodes with 'magvit' or 'shapes'")
        from .magvit import MagvitV2
        if not cfg.decoder.path:
            raise ValueError("policy.decoder.path is required for kind 'magvit' (showlab/magvitv2: a directory or "
                             "the Hub id)")
        vq = MagvitV2.from_pretrained(resolve_path(cfg.decoder.path, "policy.decoder.path"), device=device)
        return vq.decode_uint8

    def arch_from_directory(self, path: Path, cfg: Any) -> Optional[tuple[ShowoConfig, str]]:
        if not (path / "config.json").is_file():
            return None
        arch = ShowoConfig.from_release(path)
        return arch, (f"{arch.phi.num_hidden_layers} layers, hidden {arch.phi.hidden_size}, {arch.num_vq_tokens} "
                      f"image tokens")

    def config_problems(self, cfg: Any) -> list[str]:
        from .factory import DecoderKind, TokenizerKind
        problems = []
        if cfg.phi_config is not None and not Path(cfg.phi_config).is_file():
            problems.append(f"policy.phi_config={cfg.phi_config!r} does not exist")
        if cfg.decoder.kind == DecoderKind.vqvae:
            problems.append("policy.decoder.kind=vqvae is Meissonic's decoder: Show-o decodes with 'magvit' (a "
                            "showlab/magvitv2 directory or Hub id) or 'shapes'")
        if cfg.decoder.kind == DecoderKind.magvit and not _local_or_hub(cfg.decoder.path):
            problems.append(f"policy.decoder.path={cfg.decoder.path!r} must be a showlab/magvitv2 directory or Hub id")
        if cfg.tokenizer.kind == TokenizerKind.hf and not _local_or_hub(cfg.tokenizer.path, directory=True):
            problems.append(f"policy.tokenizer.path={cfg.tokenizer.path!r} must be a phi-1.5 tokenizer directory or "
                            f"Hub id")
        if cfg.text_encoder is not None:
            problems.append("policy.text_encoder is Meissonic's: Show-o encodes the text with its own layers; "
                            "remove it")
        return problems

    def prompt_token_counts(self, cfg: Any, prompts: Sequence[str]) -> tuple[list[int], int, str]:
        # the text area holds <t2i> <bos> ids <eos> in max_seq_length + 1 positions
        from .factory import build_tokenizer
        arch = cfg.arch
        ids = build_tokenizer(cfg, arch.llm_vocab_size, PHI_TOKENIZER)(list(prompts))
        limit = int(cfg.max_seq_length or arch.max_seq_length)
        return ([len(t) + (2 if t and t[0] == arch.bos_id else 3) for t in ids], limit + 1,
                f"policy.arch.max_seq_length={limit} tokens")

    def rollout_bytes_per_sample(self, arch: ShowoConfig, steps: int, guided: bool) -> int:
        """Its trajectory record (codes and log-probs of every step) plus one forward pass over its sequence in
        float32 (the residual stream, layer norm and q/k/v: six hidden-wide copies; then the widest stage, two
        copies of the MLP activations or of the attention scores, or four of the codebook logits), twice with
        guidance on. (configs/tiny.yaml: 0.12 MiB estimated, 0.15 MiB measured by `python -m
        benchmarks.rollout_memory` at G=2000 and 8000, 2-core CPU.)"""
        n, seq = arch.num_vq_tokens, arch.max_seq_length + 1 + arch.num_vq_tokens + 2
        trajectory = steps * n * (8 + 4 + 4) + n * 8
        widest = max(4 * n * arch.codebook_size, 2 * seq * arch.phi.intermediate_size,
                     2 * arch.phi.num_attention_heads * seq * seq)
        forward = 4 * (6 * seq * arch.phi.hidden_size + widest)
        return trajectory + forward * (2 if guided else 1)

    def has_weights(self, directory: Path) -> bool:
        return has_pretrained_weights(directory)


def _local_or_hub(value: Optional[str], directory: bool = True) -> bool:
    if not value:
        return False
    p = Path(value).expanduser()
    return (p.is_dir() if directory else p.exists()) or (not p.exists() and is_hub_id(value))


SHOWO = ShowoFamily()
