"""Tiny models for tests, debugging and the CPU default run: the real architectures at toy sizes."""
from __future__ import annotations

from typing import Any

from .showo import PhiArch, ShowoConfig


def showo_config_from_fixture(tiny: dict[str, Any]) -> ShowoConfig:
    """The ShowoConfig of a `tiny_config.json` of the reference vectors (tests/fixtures/showo)."""
    return ShowoConfig(vocab_size=tiny["vocab_size"], llm_vocab_size=tiny["llm_vocab_size"],
                       codebook_size=tiny["codebook_size"], num_vq_tokens=tiny["num_vq_tokens"],
                       num_new_special_tokens=tiny["num_new_special_tokens"], max_seq_length=tiny["max_seq_length"],
                       bos_id=tiny["bos"], eos_id=tiny["eos"], phi=PhiArch.from_hf_config(tiny["phi"]))
