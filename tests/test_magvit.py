"""MAGVIT-v2 tokenizer: parity with the reference (tiny fixture), release key layout, loading and saving."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from policy.magvit import MagvitConfig, MagvitV2, to_uint8
from policy.weights import CheckpointError, save_state_dict


def _fixture(fixture_dir: Path, name: str) -> Path:
    """A reference-vector file (tests/fixtures/showo, or $MASKGRPO_PARITY_DIR): missing is an error, not a skip."""
    p = fixture_dir / name
    if not p.is_file():
        pytest.fail(f"parity fixture {p} not found: the reference vectors ship in tests/fixtures/showo")
    return p


@pytest.fixture(scope="module")
def vectors(fixture_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(_fixture(fixture_dir, "tiny_magvit_vectors.safetensors")))


@pytest.fixture(scope="module")
def tiny_config(fixture_dir) -> MagvitConfig:
    return MagvitConfig.from_tiny_fixture(json.loads(_fixture(fixture_dir, "tiny_config.json").read_text()))


@pytest.fixture(scope="module")
def tiny_weights(vectors) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vectors.items() if k.split(".", 1)[0] in ("encoder", "decoder", "quantize")}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_config, tiny_weights) -> Path:
    """A release-style directory of the tiny model (config.json + model.safetensors)."""
    d = tmp_path_factory.mktemp("tiny_magvit")
    model = MagvitV2(tiny_config)
    model.load_state_dict(tiny_weights)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> MagvitV2:
    return MagvitV2.from_pretrained(tiny_dir)


# ----------------------------------------------------------------------------------------------------------------
# parity with the reference implementation

def test_magvit_parity_decode(tiny, vectors):
    out = tiny.decode(vectors["codes"])
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, vectors["pixels"], rtol=1e-4, atol=1e-5)
    # batching does not change a row
    torch.testing.assert_close(tiny.decode(vectors["codes"][1:]), out[1:], rtol=1e-4, atol=1e-5)


def test_magvit_parity_encode(tiny, vectors):
    codes = tiny.encode(vectors["image"])
    assert codes.dtype == torch.long and codes.shape == (2, 16)
    assert torch.equal(codes, vectors["encoded_codes"])


def test_magvit_parity_decode_uint8(tiny, vectors):
    ref = (torch.clamp((vectors["pixels"] + 1.0) / 2.0, min=0.0, max=1.0) * 255.0)
    ref = ref.permute(0, 2, 3, 1).numpy().astype("uint8")
    got = tiny.decode_uint8(vectors["codes"]).numpy()
    # float noise may flip a value sitting on an integer boundary by one step, nothing more
    assert abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert (got == ref).mean() > 0.99


def test_magvit_parity_loads_raw_fixture_keys(tiny_config, tiny_weights, vectors):
    from policy.weights import load_strict
    model = MagvitV2(tiny_config)
    load_strict(model, tiny_weights, "tiny MAGVIT-v2")   # the fixture's names are the release's names
    torch.testing.assert_close(model.decode(vectors["codes"]), vectors["pixels"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# release layout

def test_magvit_manifest(fixture_dir):
    manifest = json.loads(_fixture(fixture_dir, "manifest_magvitv2.json").read_text())
    with torch.device("meta"):
        model = MagvitV2(MagvitConfig())
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(manifest) - set(own)) == []
    assert sorted(set(own) - set(manifest)) == []
    assert own == manifest
    assert list(own) == list(manifest)   # same registration order as the reference
    assert model.quantize.power_vals.dtype == torch.long
    assert model.codebook_size == 8192 and model.config.downsample_factor == 16


def test_magvit_release_config_json_gives_defaults(tmp_path):
    # the release's config.json holds no architecture (the reference constructor takes no arguments)
    cfg = MagvitConfig.from_release_config({"_class_name": "MAGViTv2", "_diffusers_version": "0.30.0"})
    assert cfg == MagvitConfig()
    (tmp_path / "config.json").write_text(json.dumps({"ch": 64, "z_channels": 10, "unused": 1}))
    cfg = MagvitConfig.from_json_file(tmp_path / "config.json")
    assert cfg.ch == 64 and cfg.z_channels == 10 and cfg.codebook_size == 1024


def test_magvit_config_from_nested_dicts(tiny_config):
    assert tiny_config.ch == 32 and tiny_config.encoder_ch_mult == [1, 2] and tiny_config.decoder_ch_mult == [1, 2]
    assert tiny_config.z_channels == 6 and tiny_config.attn_resolutions == [4] and tiny_config.resolution == 8
    with pytest.raises(ValueError, match="share"):
        MagvitConfig.from_encoder_decoder({"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1},
                                          {"ch": 64, "ch_mult": [1, 2], "num_res_blocks": 1})
    with pytest.raises(ValueError, match="multiples of 32"):
        MagvitConfig(ch=48)
    with pytest.raises(ValueError, match="entries"):
        MagvitConfig(encoder_num_res_blocks=[1, 2])
    assert MagvitConfig.from_release_config({"encoder_num_res_blocks": 2}).encoder_num_res_blocks == [2] * 5


def test_magvit_tiny_attention_placement(tiny_config):
    model = MagvitV2(tiny_config)
    names = {k.rsplit(".", 2)[0] for k in model.state_dict() if ".attn." in k}
    # attention follows each block of the level whose configured resolution is 4
    assert names == {"encoder.down.1.attn.0", "decoder.up.1.attn.0"}


# ----------------------------------------------------------------------------------------------------------------
# saving and loading

def test_magvit_save_load_round_trip(tmp_path, tiny, vectors):
    tiny.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    again = MagvitV2.from_pretrained(tmp_path / "ckpt")
    assert again.config == tiny.config
    a, b = tiny.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in again.parameters()) and not again.training
    assert torch.equal(again.decode(vectors["codes"]), tiny.decode(vectors["codes"]))


@pytest.mark.parametrize("weights_name", ["pytorch_model.safetensors", "pytorch_model.bin"])
def test_magvit_loads_release_file_names(tmp_path, tiny_config, tiny_weights, vectors, weights_name):
    # the HF release ships config.json + pytorch_model.safetensors (older copies: pytorch_model.bin)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "MAGViTv2", **tiny_config.to_dict()}))
    save_state_dict(tiny_weights, tmp_path / weights_name)
    model = MagvitV2.from_pretrained(tmp_path)
    torch.testing.assert_close(model.decode(vectors["codes"]), vectors["pixels"], rtol=1e-4, atol=1e-5)


def test_magvit_from_pretrained_dtype(tiny_dir, vectors):
    model = MagvitV2.from_pretrained(tiny_dir, device="cpu", dtype=torch.bfloat16)
    assert model.decoder.conv_out.weight.dtype == torch.bfloat16
    assert model.quantize.power_vals.dtype == torch.long
    out = model.decode(vectors["codes"])
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: pixels in [-1.5, 2.4] are off by a few bf16 steps at most (measured on the
    # CPU: max 0.028, mean 0.006); a wrong cast (e.g. a constant left in bf16 where fp32 is needed) is far larger
    err = (out.float() - vectors["pixels"]).abs()
    assert err.max() < 0.04 and err.mean() < 0.01, (err.max(), err.mean())
    codes = model.encode(vectors["image"])      # float32 input is cast to the model's dtype
    assert codes.dtype == torch.long and codes.shape == vectors["encoded_codes"].shape
    # a latent whose sign sits within bf16 rounding of zero flips one bit of its lookup-free code, and which ones do
    # depends on the CPU's bf16 kernels (CI's CPU flipped 1 of 32 where ours flipped none); a wrong cast changes most
    agree = (codes == vectors["encoded_codes"]).float().mean()
    assert agree >= 0.9, agree


def test_magvit_load_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MagvitV2.from_pretrained(tmp_path / "nope")


def test_magvit_load_error_missing_config(tmp_path, tiny_weights):
    save_state_dict(tiny_weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        MagvitV2.from_pretrained(tmp_path)


def test_magvit_load_error_no_weights(tmp_path, tiny_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_dict()))
    with pytest.raises(CheckpointError, match="no weights"):
        MagvitV2.from_pretrained(tmp_path)


def test_magvit_load_error_corrupted_file(tmp_path, tiny_dir):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    data = (tiny_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])   # truncated download
    with pytest.raises(CheckpointError, match="corrupted"):
        MagvitV2.from_pretrained(d)


def test_magvit_load_error_corrupted_config(tmp_path, tiny_dir):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"ch": 32, ')
    (d / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="config.json"):
        MagvitV2.from_pretrained(d)


def test_magvit_load_error_wrong_shapes(tmp_path, tiny_config, tiny_weights):
    # the weights of the tiny model under the config of a wider one
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config.to_dict(), "ch": 64}))
    save_state_dict(tiny_weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match(.|\n)*decoder\.conv_in\.weight: checkpoint shape "
                                              r"\(64, 6, 3, 3\) != model shape \(128, 6, 3, 3\)"):
        MagvitV2.from_pretrained(tmp_path)


def test_magvit_load_error_missing_tensor(tmp_path, tiny_config, tiny_weights):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_dict()))
    sd = {k: v for k, v in tiny_weights.items() if k != "decoder.conv_out.bias"}
    save_state_dict(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*decoder\.conv_out\.bias"):
        MagvitV2.from_pretrained(tmp_path)


def test_magvit_quantizer_buffers_optional_but_checked(tmp_path, tiny_config, tiny_weights, vectors):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_dict()))
    sd = {k: v for k, v in tiny_weights.items() if not k.startswith("quantize.")}
    save_state_dict(sd, tmp_path / "model.safetensors")
    model = MagvitV2.from_pretrained(tmp_path)   # constants rebuilt
    torch.testing.assert_close(model.decode(vectors["codes"]), vectors["pixels"], rtol=1e-4, atol=1e-5)

    bad = dict(tiny_weights)
    bad["quantize.embedding"] = -tiny_weights["quantize.embedding"]
    save_state_dict(bad, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="quantize.embedding"):
        MagvitV2.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# encode / decode interface

def test_magvit_decode_uint8_dtype_shape_range(tiny, vectors):
    img = tiny.decode_uint8(vectors["codes"])
    assert img.dtype == torch.uint8 and img.shape == (2, 8, 8, 3)
    assert img.is_contiguous()
    assert int(img.min()) >= 0 and int(img.max()) <= 255
    assert int(img.max()) == 255 and int(img.min()) == 0   # the fixture's pixels leave [-1, 1]: clamped


def test_to_uint8_truncates_like_reference():
    # (x + 1) / 2 * 255 = 127.9 -> 127 (astype(uint8) truncates), out of range clamps
    x = torch.tensor([127.9 / 255 * 2 - 1, -1.5, 1.5]).view(1, 3, 1, 1)
    out = to_uint8(x)
    assert out.shape == (1, 1, 1, 3) and out.flatten().tolist() == [127, 0, 255]


def test_magvit_decode_shapes_and_validation(tiny):
    codes = torch.randint(0, 64, (3, 16))
    assert tiny.decode(codes).shape == (3, 3, 8, 8)
    # a non-square grid needs its shape
    wide = torch.randint(0, 64, (1, 8))
    assert tiny.decode(wide, shape=(2, 4)).shape == (1, 3, 4, 8)
    with pytest.raises(ValueError, match="square"):
        tiny.decode(wide)
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        tiny.decode(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        tiny.decode(torch.full((1, 16), -1))
    with pytest.raises(ValueError, match="integer"):
        tiny.decode(codes.float())


def test_magvit_encode_decode_consistent(tiny):
    # codes of a decoded image are well defined and the code grid follows the image size
    torch.manual_seed(0)
    img = torch.rand(2, 3, 16, 8) * 2 - 1
    codes = tiny.encode(img)
    assert codes.shape == (2, 8 * 4) and int(codes.min()) >= 0 and int(codes.max()) < 64
    assert tiny.decode(codes, shape=(8, 4)).shape == (2, 3, 16, 8)
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny.encode(torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode(torch.zeros(3, 8, 8))
