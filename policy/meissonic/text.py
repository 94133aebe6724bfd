"""Meissonic's text path: CLIP token ids -> (pooled embedding, per-token hidden states), as the release's pipeline.

The release conditions on `CLIPTextModelWithProjection` (CLIP-ViT-H/14's text tower, in ``text_encoder/``) run
on 77 token ids made by `CLIPTokenizer(padding="max_length", truncation=True, max_length=77)` (``tokenizer/``):
the pooled condition is the projected ``text_embeds`` and the per-token condition the **penultimate** hidden state
(``hidden_states[-2]``, not the last layer's output, not final-layer-normed). No attention mask is passed: CLIP's
causal mask already keeps real tokens from seeing the padding, and the pooled embedding is read at the first
end-of-text token, so padding never reaches it.

transformers' class is used as is (its parameter names are the release's, and it is maintained for every
transformers version we support); only loading is wrapped, offline and strict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from policy.weights import CheckpointError

TEXT_LENGTH = 77   # the pipeline's max_length (CLIP's position count)


def pad_token_ids(token_ids: Sequence[Sequence[int]], bos_id: int, eos_id: int, pad_id: int,
                  length: int = TEXT_LENGTH) -> torch.Tensor:
    """long [B, length]: ``bos + ids + eos``, then `pad_id` up to `length`, for token ids without special tokens.

    What `CLIPTokenizer(..., padding="max_length", truncation=True, max_length=length)` returns for the same
    text: a longer prompt is cut to its first ``length - 2`` ids and still ends with ``eos`` (the tokenizer
    truncates before adding the special tokens). The release's pad id is its tokenizer's (in the fixtures it
    equals eos); take it from the tokenizer, not from the text encoder's config.
    """
    if length < 2:
        raise ValueError(f"length {length} leaves no room for bos and eos")
    out = torch.full((len(token_ids), length), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        body = list(ids)[: length - 2]
        out[row, : len(body) + 2] = torch.tensor([bos_id, *body, eos_id], dtype=torch.long)
    return out


def load_clip_tokenizer(directory: str | Path):
    """The release's `CLIPTokenizer` from a local ``tokenizer/`` directory (no download)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"CLIP tokenizer directory {str(d)!r} does not exist: give the tokenizer/ folder of a "
                              f"local copy of MeissonFlow/Meissonic (vocab.json + merges.txt)")
    from transformers import CLIPTokenizer
    try:
        return CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load the CLIP tokenizer in {str(d)!r} ({type(e).__name__}: {e})") from e


def tokenize(tokenizer, prompts: Sequence[str], length: int = TEXT_LENGTH) -> torch.Tensor:
    """long [B, length] ids of `prompts` exactly as the release's pipeline makes them."""
    return tokenizer(list(prompts), return_tensors="pt", padding="max_length", truncation=True,
                     max_length=length).input_ids


class MeissonicTextEncoder(nn.Module):
    """`CLIPTextModelWithProjection` returning the release's two conditions for input ids [B, 77]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "MeissonicTextEncoder":
        """Load a local ``text_encoder/`` directory (config.json + model.safetensors), offline, refusing any
        missing, unexpected or mis-shaped tensor; eval mode, gradients off."""
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise CheckpointError(f"CLIP text encoder directory {str(d)!r} does not exist: give the text_encoder/ "
                                  f"folder of a local copy of MeissonFlow/Meissonic")
        if not (d / "config.json").is_file():
            raise CheckpointError(f"CLIP text encoder directory {str(d)!r} has no config.json")
        from transformers import CLIPTextModelWithProjection
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()        # a bar per load would clutter every actor's log
        kwargs = {"dtype": dtype} if dtype is not None else {}
        try:
            model, info = CLIPTextModelWithProjection.from_pretrained(str(d), local_files_only=True,
                                                                      output_loading_info=True, **kwargs)
        except Exception as e:
            raise CheckpointError(f"cannot load the CLIP text encoder in {str(d)!r} ({type(e).__name__}: {e})") from e
        problems = [f"{k.replace('_', ' ')}: {sorted(map(str, v))[:5]}" for k, v in info.items() if v]
        if problems:
            raise CheckpointError(f"CLIP text encoder {str(d)!r} does not match its config: {'; '.join(problems)}")
        model.requires_grad_(False)
        return cls(model.eval())

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, projection_dim] = ``text_embeds``, encoder_hidden_states [B, L, hidden] =
        ``hidden_states[-2]``) for long input ids [B, L]."""
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return out.text_embeds, out.hidden_states[-2]
