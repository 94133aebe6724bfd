"""Show-o transformer: parity with the reference vectors, prompt layout, manifest, loading errors."""
from __future__ import annotations

import json

import pytest
import torch

from policy.layout import omni_attention_mask
from policy.showo import Showo, ShowoConfig
from policy.weights import CheckpointError


def test_showo_parity_logits(tiny_showo, showo_vectors):
    ids = torch.cat([showo_vectors["input_ids"], showo_vectors["uncond_input_ids"]])
    with torch.no_grad():
        logits = tiny_showo(ids)
    torch.testing.assert_close(logits, showo_vectors["logits"], rtol=1e-4, atol=1e-5)


def test_showo_parity_attention_mask(tiny_showo, showo_vectors):
    ids = torch.cat([showo_vectors["input_ids"], showo_vectors["uncond_input_ids"]])
    mask = omni_attention_mask(ids, tiny_showo.layout)
    assert torch.equal(mask[:, 0], showo_vectors["attention_bias"] == 0)


def test_showo_parity_prefix_reuse(tiny_showo, showo_vectors):
    """Image logits with the cached text prefix equal the full-sequence pass and the reference."""
    layout = tiny_showo.layout
    ids = torch.cat([showo_vectors["input_ids"], showo_vectors["uncond_input_ids"]])
    text, image = ids[:, : layout.text_len], ids[:, layout.text_len + 1: -1]
    codes = torch.where(image == layout.mask_id, -1, image - layout.image_offset)
    ref = showo_vectors["logits"][:, layout.text_len + 1: -1, layout.image_offset: layout.mask_id]
    with torch.no_grad():
        cached = tiny_showo.image_logits(tiny_showo.encode_text(text), codes)
        full = tiny_showo.image_logits_full(text, codes)
    torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-5)


def test_showo_parity_text_area(tiny_showo, showo_vectors, fixture_dir):
    """The fixture's first prompt: left padding; third prompt (20 tokens): truncation to max_seq_length."""
    layout = tiny_showo.layout
    prompt = json.loads((fixture_dir / "tiny_showo_trajectories.json").read_text())["prompt_text_ids"]
    ids = showo_vectors["input_ids"]
    assert torch.equal(layout.text_area([prompt])[0], ids[0, : layout.text_len])
    # Recover each row's text tokens from the fixture and rebuild its text area.
    for row in ids:
        area = row[: layout.text_len].tolist()
        text = [t for t in area if t not in (layout.pad_id, layout.t2i_id)][1:-1]  # drop <bos>, <eos>
        rebuilt = layout.text_area([text])[0]
        assert torch.equal(rebuilt, row[: layout.text_len])
    long_text = list(range(20))
    area = layout.text_area([long_text])[0].tolist()
    assert area == [layout.t2i_id, layout.bos_id] + long_text[: layout.max_seq_length - 2] + [layout.eos_id]
    assert torch.equal(layout.empty_text_area(1)[0], showo_vectors["uncond_input_ids"][0, : layout.text_len])


def test_showo_manifest_full_size(fixture_dir):
    manifest = json.loads((fixture_dir / "manifest_showo_phi15_vocab58498.json").read_text())
    with torch.device("meta"):
        model = Showo(ShowoConfig())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: list(v) for k, v in manifest.items()}


def test_showo_save_load_round_trip(tiny_showo, tmp_path):
    tiny_showo.save_pretrained(tmp_path / "ckpt")
    loaded = Showo.from_pretrained(tmp_path / "ckpt")
    for (k, a), (k2, b) in zip(tiny_showo.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # A plain state dict (the authors' mycheckpoint.pth) loads with an explicit config.
    torch.save(tiny_showo.state_dict(), tmp_path / "mycheckpoint.pth")
    plain = Showo.from_pretrained(tmp_path / "mycheckpoint.pth", config=tiny_showo.config)
    assert torch.equal(plain.showo.lm_head.weight, tiny_showo.showo.lm_head.weight)


def test_showo_loading_errors(tiny_showo, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Showo.from_pretrained(tmp_path / "nowhere")
    tiny_showo.save_pretrained(tmp_path / "ok")
    # wrong shapes: a config with another codebook
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["codebook_size"] = 32
    cfg["vocab_size"] = cfg["vocab_size"] - 32
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="checkpoint shape"):
        Showo.from_pretrained(tmp_path / "ok")
    # missing keys
    sd = dict(tiny_showo.state_dict())
    sd.pop("showo.lm_head.bias")
    sd["showo.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*\n.*unexpected 1"):
        Showo.from_pretrained(tmp_path / "partial.pth", config=tiny_showo.config)
    # corrupted file
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupted"):
        Showo.from_pretrained(tmp_path / "broken.pth", config=tiny_showo.config)
    # a plain state dict without a config
    with pytest.raises(CheckpointError, match="also give the model config"):
        Showo.from_pretrained(tmp_path / "partial.pth")
    # a directory without config.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Showo.from_pretrained(tmp_path / "empty")
