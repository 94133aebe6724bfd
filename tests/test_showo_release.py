"""Checkpoints in Show-o's own format, both ways.

What showlab/Show-o's code reads and writes (read in its models/modeling_showo.py and models/modeling_utils.py):
its `Showo.from_pretrained(dir)` opens ``pytorch_model.safetensors`` (else ``pytorch_model.bin``) and builds
``Showo(w_clip_vit, vocab_size, llm_vocab_size, llm_model_path='', codebook_size=8192, num_vq_tokens=256,
load_from_showo=True, **kwargs)`` from config.json (diffusers' config handling: ``_class_name``, unknown keys
ignored); with ``load_from_showo`` the Phi is ``PhiForCausalLM(AutoConfig.from_pretrained(llm_model_path))`` (Show-o's
fork of transformers' Phi: QK LayerNorm always on), resized to ``vocab_size``; ``mask_token_id`` = vocab_size - 1.
Its `save_pretrained` writes config.json with those init arguments plus ``_class_name``, ``_diffusers_version`` and
``mask_token_id`` (nothing about the Phi's sizes, nor max_seq_length) and the weights as
``pytorch_model.safetensors`` (``pytorch_model.bin`` without safe serialisation).

Show-o's code needs diffusers and is not installed here: the first direction is checked against that contract,
and by building the Phi the way Show-o does, with transformers' `PhiForCausalLM` (the same module tree, QK LayerNorm
switched on) from the config that ``llm_model_path`` names, loading our tensors strictly and comparing logits.
"""
from __future__ import annotations

import json

import pytest
import torch

from policy.showo import (LEGACY_WEIGHTS_NAME, PHI_1_5, WEIGHTS_NAME, PhiArch, Showo, ShowoConfig,
                          has_pretrained_weights)

SHOWO_INIT_REQUIRED = ("w_clip_vit", "vocab_size", "llm_vocab_size")                  # no default in Showo.__init__
SHOWO_INIT_OPTIONAL = ("llm_model_path", "codebook_size", "num_vq_tokens", "load_from_showo")


def _showo_style_dir(tmp_path, model: Showo, weights_name: str = WEIGHTS_NAME, llm_model_path: str = PHI_1_5,
                     extra: dict | None = None):
    """A directory as Show-o's own save_pretrained writes it: its config keys only, its weight file name."""
    from safetensors.torch import save_file
    c = model.config
    d = tmp_path / "saved_by_showo"
    d.mkdir()
    cfg = {"_class_name": "Showo", "_diffusers_version": "0.30.1", "w_clip_vit": False, "vocab_size": c.vocab_size,
           "llm_vocab_size": c.llm_vocab_size, "llm_model_path": llm_model_path, "codebook_size": c.codebook_size,
           "num_vq_tokens": c.num_vq_tokens, "load_from_showo": False, "mask_token_id": c.vocab_size - 1,
           **(extra or {})}
    (d / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(sd, str(d / weights_name), metadata={"format": "pt"})
    else:
        torch.save(sd, d / weights_name)
    return d


# ---------------------------------------------------------------------------------------------- ours → Show-o

def test_saved_directory_has_show_o_file_names_and_config_keys(tiny_showo, tmp_path):
    from safetensors import safe_open
    tiny_showo.save_pretrained(tmp_path / "ckpt")
    d = tmp_path / "ckpt"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "llm", WEIGHTS_NAME]
    assert WEIGHTS_NAME == "pytorch_model.safetensors"          # the first name Show-o's ModelMixin opens
    with safe_open(str(d / WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tiny_showo.state_dict())
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["_class_name"] == "Showo"
    for key in SHOWO_INIT_REQUIRED + SHOWO_INIT_OPTIONAL:
        assert key in cfg, key
    c = tiny_showo.config
    assert cfg["w_clip_vit"] is False and cfg["load_from_showo"] is True      # no CLIP projector; no phi download
    assert (cfg["vocab_size"], cfg["llm_vocab_size"], cfg["codebook_size"], cfg["num_vq_tokens"]) == \
        (175, 100, 64, 16) == (c.vocab_size, c.llm_vocab_size, c.codebook_size, c.num_vq_tokens)
    assert cfg["mask_token_id"] == cfg["vocab_size"] - 1 == tiny_showo.layout.mask_id
    assert cfg["num_new_special_tokens"] == 10
    # the tiny Phi is not phi-1.5: llm_model_path names the Phi config saved beside the weights
    assert cfg["llm_model_path"] == str((d / "llm").resolve())
    assert has_pretrained_weights(d)


def test_show_o_style_construction_from_our_checkpoint_gives_our_logits(tiny_showo, showo_vectors, tmp_path):
    """Build the Phi as Show-o's Showo does (AutoConfig of llm_model_path, resized to vocab_size), load strictly."""
    from transformers import AutoConfig, PhiForCausalLM
    from safetensors.torch import load_file
    tiny_showo.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    phi_cfg = AutoConfig.from_pretrained(cfg["llm_model_path"], local_files_only=True)
    assert phi_cfg.model_type == "phi" and phi_cfg.hidden_size == 64 and phi_cfg.num_hidden_layers == 2
    assert phi_cfg.num_attention_heads == 4 and phi_cfg.intermediate_size == 256 and phi_cfg.qk_layernorm
    phi = PhiForCausalLM(phi_cfg)
    phi.resize_token_embeddings(cfg["vocab_size"], mean_resizing=False)
    weights = load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME))
    assert all(k.startswith("showo.") for k in weights)           # Show-o's attribute holding the Phi
    missing, unexpected = phi.load_state_dict({k[len("showo."):]: v for k, v in weights.items()}, strict=False)
    assert missing == [] and unexpected == []
    phi.eval()
    ids = showo_vectors["input_ids"][:, :17]                       # the text area: causal attention
    causal = torch.ones(17, 17, dtype=torch.bool).tril()[None, None].expand(ids.shape[0], 1, 17, 17)
    with torch.no_grad():
        ours = tiny_showo(ids, attention_mask=causal)
        theirs = phi(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_full_size_config_names_phi_1_5(fixture_dir):
    """Every Show-o release is phi-1.5 sized: its config points at microsoft/phi-1_5, as the releases' do."""
    cfg = ShowoConfig().release_config()
    assert cfg["llm_model_path"] == PHI_1_5 == "microsoft/phi-1_5"
    assert (cfg["vocab_size"], cfg["llm_vocab_size"], cfg["codebook_size"], cfg["num_vq_tokens"]) == \
        (58498, 50295, 8192, 256)
    assert cfg["mask_token_id"] == 58497 and cfg["w_clip_vit"] is False
    big = ShowoConfig(num_vq_tokens=1024).release_config()
    assert big["num_vq_tokens"] == 1024 and big["llm_model_path"] == PHI_1_5
    with pytest.raises(ValueError, match="llm_model_path"):
        ShowoConfig(phi=PhiArch(num_hidden_layers=2)).release_config()
    # the sizes read from the released tensor shapes are phi-1.5's
    manifest = json.loads((fixture_dir / "manifest_showo_phi15_vocab58498.json").read_text())
    assert PhiArch.sizes_from_tensors(manifest, PhiArch(hidden_size=1, num_hidden_layers=1,
                                                        num_attention_heads=1, intermediate_size=1)) == PhiArch()


def test_checkpoint_round_trip_and_old_file_name(tiny_showo, tmp_path):
    tiny_showo.save_pretrained(tmp_path / "ckpt")
    loaded = Showo.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == tiny_showo.config
    a, b = tiny_showo.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint of an earlier version: model.safetensors and our old config.json (our fields + phi)
    old = tmp_path / "old"
    old.mkdir()
    (tmp_path / "ckpt" / WEIGHTS_NAME).rename(old / LEGACY_WEIGHTS_NAME)
    cfg = {**tiny_showo.config.to_dict(), "_class_name": "Showo", "mask_token_id": tiny_showo.layout.mask_id}
    (old / "config.json").write_text(json.dumps(cfg))
    assert has_pretrained_weights(old)
    again = Showo.from_pretrained(old)
    assert again.config == tiny_showo.config and all(torch.equal(v, a[k]) for k, v in again.state_dict().items())
    # saving over it replaces the old file name
    again.save_pretrained(old)
    assert not (old / LEGACY_WEIGHTS_NAME).exists() and (old / WEIGHTS_NAME).is_file()


# ---------------------------------------------------------------------------------------------- Show-o → ours

@pytest.mark.parametrize("weights_name", ["pytorch_model.safetensors", "pytorch_model.bin"])
def test_directory_saved_by_show_o_loads_without_extra_arguments(tiny_showo, showo_vectors, tmp_path, weights_name):
    d = _showo_style_dir(tmp_path, tiny_showo, weights_name)
    model = Showo.from_pretrained(d)                    # no phi_config=, no max_seq_length=
    c = model.config
    # sizes from the tensors, the rest from phi-1.5's defaults (llm_model_path is a hub id here)
    assert (c.phi.hidden_size, c.phi.num_hidden_layers, c.phi.num_attention_heads, c.phi.intermediate_size) == \
        (64, 2, 4, 256)
    assert (c.phi.partial_rotary_factor, c.phi.rope_theta, c.phi.hidden_act) == (0.5, 10000.0, "gelu_new")
    assert c.num_new_special_tokens == 10                     # 175 - 100 - 64 - 1
    assert c.bos_id == c.eos_id == 99                          # the text vocabulary's last id (no 50256 in 100)
    assert c.max_seq_length == 128                             # Show-o's releases' prompt length
    assert model.layout.mask_id == 174
    assert all(torch.equal(v, tiny_showo.state_dict()[k]) for k, v in model.state_dict().items())
    # the prompt length is a training-config value (Show-o's yaml), not in its config.json nor in any tensor:
    # the fixture's prompts are 16 tokens long, so its sequences need max_seq_length=16
    model = Showo.from_pretrained(d, max_seq_length=16)
    assert model.layout == tiny_showo.layout        # (max_position_embeddings: phi-1.5's 2048, unused up to it)
    ids = torch.cat([showo_vectors["input_ids"], showo_vectors["uncond_input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), showo_vectors["logits"], rtol=1e-4, atol=1e-5)


def test_show_o_directory_reads_a_local_llm_config(tiny_showo, tiny_config_dict, tmp_path):
    """When llm_model_path is a local Phi directory, the values tensors cannot give come from its config.json."""
    llm = tmp_path / "phi"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps(tiny_config_dict["phi"]))      # transformers 4.41's format
    d = _showo_style_dir(tmp_path, tiny_showo, llm_model_path=str(llm), extra={"num_new_special_tokens": 10})
    c = Showo.from_pretrained(d, max_seq_length=16).config
    assert c.phi.max_position_embeddings == 256 and c.phi.layer_norm_eps == 1e-5   # phi-1.5 would give 2048
    assert c == tiny_showo.config


def test_show_o_directory_errors(tiny_showo, tmp_path):
    from policy.weights import CheckpointError
    d = _showo_style_dir(tmp_path, tiny_showo)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "llm_vocab_size"}))
    with pytest.raises(CheckpointError, match=r"lacks \['llm_vocab_size'\]"):
        Showo.from_pretrained(d)
    # a vocabulary that does not match the tensors still fails with the tensor and both shapes
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 207, "codebook_size": 96}))
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight: checkpoint shape \(175, 64\) != model shape \(207, 64\)"):
        Showo.from_pretrained(d)
