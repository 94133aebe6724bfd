"""Text tokenizers: a family's own from a directory (Show-o: phi-1.5's; Meissonic: CLIP's), or a word-level one
built in-process.

The ids are the tokenizer's ids without special tokens (the family's prompt layout places ``<bos>``/``<eos>``).
The word-level tokenizer serves tests and the synthetic shapes world, where no files exist.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence


class TextTokenizer(Protocol):
    def __call__(self, prompts: Sequence[str]) -> list[list[int]]: ...


class HFTextTokenizer:
    """A `transformers` tokenizer loaded from a local path (`what` names the one the family expects there)."""

    def __init__(self, path: str | Path, what: str = "a transformers tokenizer directory"):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"text tokenizer directory {str(p)!r} does not exist: give {what}")
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)

    def __call__(self, prompts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


class WordTokenizer:
    """Lower-cased whitespace words → ids from a fixed word list; unknown words map to `unk_id`.

    Built with the `tokenizers` library's WordLevel model so it behaves like any fast tokenizer.
    """

    def __init__(self, words: Sequence[str], llm_vocab_size: int):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        vocab = {"<unk>": 0}
        for w in words:
            vocab.setdefault(w.lower(), len(vocab))
        if len(vocab) > llm_vocab_size - 1:   # the last text id is <bos>/<eos>
            raise ValueError(f"{len(vocab)} words do not fit a text vocabulary of {llm_vocab_size}")
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = tok
        self.vocab = vocab

    def __call__(self, prompts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(list(prompts))]
