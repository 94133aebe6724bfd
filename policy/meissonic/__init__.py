"""Meissonic (viiika/Meissonic, `MeissonFlow/Meissonic` on the Hub): our transformer, and the release's text
encoder and VQ decoder loaded through transformers / diffusers, each reading its folder of the released layout
(``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vqvae/``)."""
from policy.meissonic.text import (TEXT_LENGTH, MeissonicTextEncoder, load_clip_tokenizer, pad_token_ids,
                                   tokenize)
from policy.meissonic.transformer import (MeissonicTransformer, MeissonicTransformerConfig, position_ids,
                                          rotary_tables, sinusoid)
from policy.meissonic.vq import MeissonicVQDecoder, to_uint8

__all__ = ["MeissonicTransformer", "MeissonicTransformerConfig", "MeissonicTextEncoder", "MeissonicVQDecoder",
           "TEXT_LENGTH", "load_clip_tokenizer", "pad_token_ids", "position_ids", "rotary_tables", "sinusoid",
           "to_uint8", "tokenize"]
