"""Show-o's token layout and the t2i prompt: where text, special tokens, image codes and the mask token live.

Vocabulary: ``[0, llm_vocab_size)`` text, then ten special tokens in the order of `SPECIAL_TOKENS`, then the
image codebook, then the mask token (last id). The t2i sequence is::

    [pad…] <t2i> <bos> text <eos> | <soi> image tokens <eoi>
    └──── text area: max_seq_length + 1 ────┘

left padded, or truncated to ``max_seq_length`` tokens after ``<t2i>`` with ``<eos>`` put back last, exactly as
Show-o's ``UniversalPrompting.t2i_prompt`` (the empty prompt, for classifier-free guidance, is ``<t2i> <bos> <eos>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SPECIAL_TOKENS = ("pad", "soi", "eoi", "sov", "eov", "t2i", "mmu", "t2v", "v2v", "lvg")


@dataclass(frozen=True)
class TokenLayout:
    llm_vocab_size: int
    codebook_size: int
    num_vq_tokens: int
    max_seq_length: int
    bos_id: int
    eos_id: int
    num_new_special_tokens: int = len(SPECIAL_TOKENS)

    def special(self, name: str) -> int:
        return self.llm_vocab_size + SPECIAL_TOKENS.index(name)

    @property
    def pad_id(self) -> int:
        return self.special("pad")

    @property
    def soi_id(self) -> int:
        return self.special("soi")

    @property
    def eoi_id(self) -> int:
        return self.special("eoi")

    @property
    def t2i_id(self) -> int:
        return self.special("t2i")

    @property
    def image_offset(self) -> int:
        """Token id of image code 0."""
        return self.llm_vocab_size + self.num_new_special_tokens

    @property
    def mask_id(self) -> int:
        return self.image_offset + self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.mask_id + 1

    @property
    def text_len(self) -> int:
        """Length of the text area (``<t2i>`` plus max_seq_length tokens)."""
        return self.max_seq_length + 1

    def text_area(self, text_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Long [B, text_len]: the text area of each prompt given as text-token ids (no special tokens)."""
        rows = []
        for ids in text_ids:
            ids = [int(i) for i in ids]
            if any(i < 0 or i >= self.llm_vocab_size for i in ids):
                raise ValueError(f"text token ids must lie in [0, {self.llm_vocab_size}); got {ids}")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
            row = [self.t2i_id] + ids + [self.eos_id]
            if len(row) <= self.text_len:
                row = [self.pad_id] * (self.text_len - len(row)) + row
            else:
                row = row[: self.text_len - 1] + [self.eos_id]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.text_len)

    def empty_text_area(self, batch: int = 1) -> torch.Tensor:
        return self.text_area([[]] * batch)

    def image_block(self, codes: torch.Tensor) -> torch.Tensor:
        """Long [B, N+2] ``<soi> tokens <eoi>`` from codes [B, N] (code -1 or `mask_id` means masked)."""
        tokens = torch.where((codes < 0) | (codes == self.mask_id), torch.full_like(codes, self.mask_id),
                             codes + self.image_offset)
        b = codes.shape[0]
        soi = torch.full((b, 1), self.soi_id, dtype=torch.long, device=codes.device)
        eoi = torch.full((b, 1), self.eoi_id, dtype=torch.long, device=codes.device)
        return torch.cat([soi, tokens, eoi], dim=1)

    def sequence(self, text_area: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([text_area, self.image_block(codes)], dim=1)


def omni_attention_mask(input_ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Bool [B, 1, L, L] (True = may attend) of Show-o's omni-attention for t2i sequences.

    Text rows are causal, rows of the ``<soi>…<eoi>`` block see the whole block and all text; no token attends to
    padding, except that padding rows see the padding before them (as in the reference, so no row is empty).
    """
    b, length = input_ids.shape
    device = input_ids.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    in_image = (torch.arange(length, device=device) >= layout.text_len).view(1, length, 1)
    is_pad = input_ids == layout.pad_id
    mask = torch.where(in_image, torch.ones_like(causal), causal)  # [1, L, L]
    mask = mask & (~is_pad.view(b, 1, length) | is_pad.view(b, length, 1))
    return mask.unsqueeze(1)
