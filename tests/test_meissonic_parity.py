"""Meissonic: parity of our transformer, text path and decoding with the authors' code (tests/fixtures/meissonic,
or $MASKGRPO_PARITY_DIR/meissonic: same file names; a missing file is an error, not a skip).

Sizes are read from the fixture's manifest.json and config.json files, never assumed, so the same tests run on a
set made the same way with another seed.

About the tolerance on the logits. Every logit is compared within 1e-5 (float32) where the timestep is 0. Where it
is not, the model embeds sin/cos(1000·t·f) in float32: angles of up to 1000·(T-1) rad, whose float32 values are
known only to ~1 ulp (5e-4 rad at 7000), and which each platform's sin/cos/exp round differently; a random-weight
model amplifies that into logit differences of 1e-4..1e-3 (measured: the reference's vectors and ours differ from
the float64 sinusoid by the same order). There the test measures that spread on the spot (our logits with the
float32 vs the float64 sinusoid) and asks |ours - reference| <= 1e-5 + 3·spread; it also checks that this bound is
tight enough to catch a timestep off by 1e-4 relative (any other architectural slip gives O(0.1..1) differences).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from policy.meissonic import (MeissonicTextEncoder, MeissonicTransformer, MeissonicTransformerConfig,
                              MeissonicVQDecoder, pad_token_ids, position_ids, to_uint8, tokenize)
from policy.meissonic.transformer import CLASS_NAME, CONFIG_NAME, WEIGHTS_NAME
from policy.weights import CheckpointError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LOGIT_ATOL = 1e-5
SPREAD_FACTOR = 3.0
LAYOUTS = {"plain": "transformer", "downsample": "transformer_downsample"}


def _path(directory: Path, name: str) -> Path:
    p = directory / name
    if not p.exists():
        pytest.fail(f"Meissonic parity fixture {p} not found: the reference vectors ship in tests/fixtures/meissonic "
                    f"(with MASKGRPO_PARITY_DIR set, in $MASKGRPO_PARITY_DIR/meissonic)")
    return p


def _json(directory: Path, name: str) -> dict:
    return json.loads(_path(directory, name).read_text())


@pytest.fixture(scope="module")
def mdir(meissonic_fixture_dir) -> Path:
    return meissonic_fixture_dir


@pytest.fixture(scope="module")
def manifest(mdir) -> dict:
    return _json(mdir, "manifest.json")


@pytest.fixture(scope="module")
def vectors(mdir) -> dict[str, torch.Tensor]:
    return load_file(str(_path(mdir, "vectors.safetensors")))


def _vec(vectors: dict, key: str) -> torch.Tensor:
    if key not in vectors:
        pytest.fail(f"vectors.safetensors has no {key!r}")
    return vectors[key]


@pytest.fixture(scope="module")
def models(mdir) -> dict[str, MeissonicTransformer]:
    return {tag: MeissonicTransformer.from_pretrained(_path(mdir, sub)) for tag, sub in LAYOUTS.items()}


def _exact_sinusoid_hook(module, inputs, output):
    """Forward hook on `time_text_embed`: the timestep's sinusoid computed in float64 (then rounded)."""
    timestep, pooled = inputs
    half = module.timestep_embedder.linear_1.in_features // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = timestep.double()[:, None] * freqs[None, :]
    sinusoid = torch.cat([angles.cos(), angles.sin()], dim=-1).to(pooled.dtype)
    return module.timestep_embedder(sinusoid) + module.text_embedder(pooled)


def _logits(model: MeissonicTransformer, *args, exact_sinusoid: bool = False) -> torch.Tensor:
    handle = model.time_text_embed.register_forward_hook(_exact_sinusoid_hook) if exact_sinusoid else None
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        if handle is not None:
            handle.remove()


def _check_logits(model, args, timestep: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """The rule of the module docstring, row by row; returns the max abs errors."""
    ours = _logits(model, *args)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    errors = (ours - reference).flatten(1).abs().max(1).values
    at_zero = timestep == 0
    assert at_zero.any() and (~at_zero).any(), "the vectors should hold rows at timestep 0 and above"
    assert errors[at_zero].max() <= LOGIT_ATOL, f"timestep-0 rows: max abs error {errors[at_zero].tolist()}"
    spread = (ours - _logits(model, *args, exact_sinusoid=True)).flatten(1).abs().max(1).values
    bound = LOGIT_ATOL + SPREAD_FACTOR * spread
    assert (errors <= bound).all(), f"errors {errors.tolist()} above 1e-5 + 3 x float32 spread {spread.tolist()}"
    # the bound still catches a timestep off by 1e-4 relative
    codes, micro, pooled, hidden = args[:4]
    off = _logits(model, codes, micro, pooled, hidden, timestep.double() * (1 + 1e-4))
    off_errors = (off - reference).flatten(1).abs().max(1).values
    assert (off_errors[~at_zero] > bound[~at_zero]).all()
    return errors.tolist()


# ----- transformer -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_parity_meissonic_transformer_logits_per_row_timesteps_in_one_call(tag, models, vectors, manifest):
    """Both layouts, the three rows (different codes, micro-conditions and timesteps) in ONE batched call."""
    codes = _vec(vectors, f"{tag}/codes")
    timestep = _vec(vectors, f"{tag}/timestep")
    assert tuple(codes.shape[1:]) == tuple(manifest["latent_hw"])
    assert (codes == manifest["mask_token_id"]).any()
    args = (codes, _vec(vectors, f"{tag}/micro_conds"), _vec(vectors, "pooled"),
            _vec(vectors, "encoder_hidden_states"), timestep)
    reference = _vec(vectors, f"{tag}/logits")
    assert reference.shape[1] == manifest["codebook_size"]
    _check_logits(models[tag], args, timestep, reference)


@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_parity_meissonic_batched_rows_equal_single_row_calls(tag, models, vectors):
    """A batch with one timestep per row gives each row what a call of its own (the reference's way: one
    timestep per call, given as a single value) gives."""
    model = models[tag]
    codes, micro = _vec(vectors, f"{tag}/codes"), _vec(vectors, f"{tag}/micro_conds")
    pooled, hidden, timestep = _vec(vectors, "pooled"), _vec(vectors, "encoder_hidden_states"), \
        _vec(vectors, f"{tag}/timestep")
    batched = _logits(model, codes, micro, pooled, hidden, timestep)
    for b in range(codes.shape[0]):
        single = _logits(model, codes[b:b + 1], micro[b:b + 1], pooled[b:b + 1], hidden[b:b + 1], timestep[b])
        torch.testing.assert_close(batched[b:b + 1], single, atol=LOGIT_ATOL, rtol=0)


def test_parity_meissonic_transformer_logits_along_a_sampling_run(models, vectors, manifest):
    """The logits the release's scheduler received at every step of the guidance-free run (`cfg1`), from the codes
    that went in, the run's micro-conditions and the step's timestep (T-1 ... 0)."""
    run = manifest["runs"]["cfg1"]
    assert run["guidance_scale"] == 1.0
    model = models["plain"]
    pooled, hidden = _vec(vectors, "pooled"), _vec(vectors, "encoder_hidden_states")
    micro = torch.tensor(run["micro_conditioning"], dtype=torch.float32).expand(pooled.shape[0], -1)
    for i in range(run["steps_recorded"]):
        codes = _vec(vectors, f"cfg1/step{i}/sample_in")
        timestep = _vec(vectors, f"cfg1/step{i}/timestep").reshape(1).expand(codes.shape[0])
        assert int(timestep[0]) == run["num_inference_steps"] - 1 - i
        reference = _vec(vectors, f"cfg1/step{i}/model_output")
        ours = _logits(model, codes, micro, pooled, hidden, timestep)
        error = (ours - reference).abs().max().item()
        if int(timestep[0]) == 0:
            assert error <= LOGIT_ATOL, f"step {i}: {error}"
        else:
            spread = (ours - _logits(model, codes, micro, pooled, hidden, timestep, exact_sinusoid=True)).abs().max()
            assert error <= LOGIT_ATOL + SPREAD_FACTOR * spread.item(), f"step {i}: {error} (spread {spread})"


@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_parity_meissonic_img_ids_convention(tag, models, vectors, manifest):
    """The rotary ids are the grid the transformer runs on: the latent grid, halved with downsampling."""
    h, w = manifest["latent_hw"]
    ids = models[tag].image_ids(h, w)
    torch.testing.assert_close(ids, _vec(vectors, f"{tag}/img_ids"), atol=0, rtol=0)
    text_len = manifest["text"]["length"]
    full = position_ids(text_len, *models[tag].transformer_grid(h, w))
    assert (full[:text_len] == 0).all() and torch.equal(full[text_len:], ids)      # txt_ids: zeros


@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_parity_meissonic_config_and_names_match_the_release_files(tag, mdir, models, manifest):
    d = _path(mdir, LAYOUTS[tag])
    raw = _json(d, CONFIG_NAME)
    config = models[tag].config
    assert config.to_dict() == {k: v for k, v in raw.items() if not k.startswith("_")}
    assert (config.vocab_size, config.codebook_size) == (manifest["vocab_size"], manifest["codebook_size"])
    with safe_open(str(_path(d, WEIGHTS_NAME)), "pt") as f:
        released = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in models[tag].state_dict().items()} == released


# ----- checkpoints -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_parity_meissonic_save_pretrained_round_trip(tag, tmp_path, mdir, models, vectors):
    model = models[tag]
    written = model.save_pretrained(tmp_path / "transformer")
    assert {p.name for p in written} == {CONFIG_NAME, WEIGHTS_NAME}
    saved_config = json.loads((tmp_path / "transformer" / CONFIG_NAME).read_text())
    release_config = _json(_path(mdir, LAYOUTS[tag]), CONFIG_NAME)
    assert saved_config["_class_name"] == CLASS_NAME == release_config["_class_name"]
    assert {k: v for k, v in saved_config.items() if not k.startswith("_")} == \
        {k: v for k, v in release_config.items() if not k.startswith("_")}
    shapes = {}
    for path in (tmp_path / "transformer" / WEIGHTS_NAME, _path(mdir, f"{LAYOUTS[tag]}/{WEIGHTS_NAME}")):
        with safe_open(str(path), "pt") as f:
            shapes[path] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert len(set(map(lambda s: tuple(sorted(s.items())), shapes.values()))) == 1
    again = MeissonicTransformer.from_pretrained(tmp_path / "transformer")
    args = (_vec(vectors, f"{tag}/codes"), _vec(vectors, f"{tag}/micro_conds"), _vec(vectors, "pooled"),
            _vec(vectors, "encoder_hidden_states"), _vec(vectors, f"{tag}/timestep"))
    assert torch.equal(_logits(again, *args), _logits(model, *args))


def test_parity_meissonic_loading_errors_are_clear(tmp_path, mdir, caplog):
    source = _path(mdir, "transformer")
    with pytest.raises(CheckpointError, match="does not exist"):
        MeissonicTransformer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        MeissonicTransformer.from_pretrained(tmp_path / "empty")
    # one tensor of the wrong shape: named in the error
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_NAME).write_text((source / CONFIG_NAME).read_text())
    tensors = load_file(str(source / WEIGHTS_NAME))
    tensors["mlm_layer.conv2.weight"] = tensors["mlm_layer.conv2.weight"][:-1].contiguous()
    save_file(tensors, str(bad / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="mlm_layer.conv2.weight"):
        MeissonicTransformer.from_pretrained(bad)
    # a config for another size: the missing/unexpected tensors are named
    raw = json.loads((source / CONFIG_NAME).read_text())
    (bad / CONFIG_NAME).write_text(json.dumps({**raw, "num_single_layers": raw["num_single_layers"] + 1}))
    save_file(load_file(str(source / WEIGHTS_NAME)), str(bad / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="missing"):
        MeissonicTransformer.from_pretrained(bad)
    # bookkeeping keys are ignored silently, unknown ones with a warning naming them
    with caplog.at_level("WARNING"):
        config = MeissonicTransformerConfig.from_dict({**raw, "_name_or_path": "x", "future_key": 1})
    assert config.to_dict() == {k: v for k, v in raw.items() if not k.startswith("_")}
    assert "future_key" in caplog.text and "_name_or_path" not in caplog.text


def test_parity_meissonic_default_config_is_the_1b_release():
    """The defaults are MeissonFlow/Meissonic's transformer/config.json: ~1 B parameters, 1024² layout."""
    config = MeissonicTransformerConfig()
    assert (config.num_layers, config.num_single_layers, config.inner_dim, config.codebook_size,
            config.vocab_size, config.downsample) == (14, 28, 1024, 8192, 8256, True)
    with torch.device("meta"):
        model = MeissonicTransformer(config)
    n = sum(p.numel() for p in model.parameters())
    assert 0.9e9 < n < 1.1e9, n


# ----- precision, training --------------------------------------------------------------------------------------
def test_parity_meissonic_gradient_checkpointing_changes_nothing(mdir, vectors):
    model = MeissonicTransformer.from_pretrained(_path(mdir, "transformer_downsample")).train()
    args = (_vec(vectors, "downsample/codes"), _vec(vectors, "downsample/micro_conds"), _vec(vectors, "pooled"),
            _vec(vectors, "encoder_hidden_states"), _vec(vectors, "downsample/timestep"))
    results = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        out = model(*args)
        out.float().logsumexp(1).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_parity_meissonic_bf16_runs_like_the_reference(models, vectors):
    """In bf16 the logits are bf16; RMSNorm statistics, rotary and sinusoids stay float32 inside. At timestep 0
    (where bf16 rounding of the timestep cannot move the embedding) the logits follow the float32 ones."""
    model = models["downsample"]
    bf16 = MeissonicTransformer(model.config)
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16).eval()
    args = (_vec(vectors, "downsample/codes"), _vec(vectors, "downsample/micro_conds"), _vec(vectors, "pooled"),
            _vec(vectors, "encoder_hidden_states"), _vec(vectors, "downsample/timestep"))
    out = _logits(bf16, *args)
    ref = _logits(model, *args)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    zero = args[4] == 0
    scale = ref[zero].abs().max()
    assert (out[zero].float() - ref[zero]).abs().max() <= 0.1 * scale      # measured 0.012..0.029 over 12 seeds


# ----- text path -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_encoder(mdir) -> MeissonicTextEncoder:
    return MeissonicTextEncoder.from_pretrained(_path(mdir, "text_encoder"))


@pytest.mark.parametrize("prefix", ["", "negative_"])
def test_parity_meissonic_text_path(prefix, text_encoder, vectors, manifest):
    """input ids -> (pooled = text_embeds, encoder_hidden_states = the penultimate hidden state)."""
    ids = _vec(vectors, f"{prefix}input_ids")
    assert ids.shape[1] == manifest["text"]["length"]
    with torch.no_grad():
        pooled, hidden = text_encoder(ids)
    torch.testing.assert_close(pooled, _vec(vectors, f"{prefix}pooled"), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden, _vec(vectors, f"{prefix}encoder_hidden_states"), atol=1e-5, rtol=0)


def test_parity_meissonic_token_padding(mdir, vectors, manifest):
    """The fixture's ids are bos + ids + eos, then the pad id: `pad_token_ids` rebuilds them from the bare ids."""
    text = manifest["text"]
    bos, eos, length = text["bos"], text["eos"], text["length"]
    pad = _json(_path(mdir, "text_encoder"), "config.json")["pad_token_id"]
    for key in ("input_ids", "negative_input_ids"):
        ids = _vec(vectors, key)
        bare = [[t for t in row.tolist()[1:] if t not in (eos, pad)] for row in ids]
        assert torch.equal(pad_token_ids(bare, bos, eos, pad, length), ids)
    long = pad_token_ids([list(range(1, 2 * length))], bos, eos, pad, length)[0]
    assert long.shape == (length,) and long[0] == bos and long[-1] == eos
    assert long[1:-1].tolist() == list(range(1, length - 1))


def test_parity_meissonic_token_padding_matches_clip_tokenizer(tmp_path):
    """`pad_token_ids` agrees with transformers' CLIPTokenizer(padding="max_length", truncation=True), the call
    of the release's pipeline, on a tiny vocabulary: short prompts padded, a long one cut with eos kept last."""
    from transformers import CLIPTokenizer
    letters = "abcdefghij"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    prompts = ["a b c", "j", " ".join(letters * 3)]
    for length in (12, 77):
        bare = tokenizer(prompts, add_special_tokens=False).input_ids
        ours = pad_token_ids(bare, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, length)
        assert torch.equal(ours, tokenize(tokenizer, prompts, length))


# ----- decoding ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder(mdir) -> MeissonicVQDecoder:
    return MeissonicVQDecoder.from_pretrained(_path(mdir, "vqvae"))


@pytest.mark.parametrize("run", ["cfg1", "cfg3"])
def test_parity_meissonic_decode(run, decoder, vectors, manifest):
    """The final step's codes -> the pipeline's image (clipped to [0, 1]); 8 bits as its PIL images."""
    spec = manifest["runs"][run]
    codes = _vec(vectors, f"{run}/step{spec['steps_recorded'] - 1}/prev_sample")
    reference = _vec(vectors, f"{run}/image")
    assert reference.shape[-2:] == (spec["height"], spec["width"])
    with torch.no_grad():
        image = decoder.decode(codes.flatten(1), grid=tuple(manifest["latent_hw"]))
        image_grid = decoder.decode(codes)
        image_u8 = decoder.decode_uint8(codes)
    torch.testing.assert_close(image, reference, atol=1e-5, rtol=0)
    assert torch.equal(image, image_grid)
    assert image_u8.dtype == torch.uint8 and image_u8.shape == (codes.shape[0], spec["height"], spec["width"], 3)
    assert torch.equal(image_u8, to_uint8(image))
    # (a float one ulp away from the reference may land on the other side of a rounding boundary)
    pipeline_u8 = (reference * 255).round().permute(0, 2, 3, 1).to(torch.uint8)
    assert (image_u8.int() - pipeline_u8.int()).abs().max() <= 1


def test_parity_meissonic_uint8_rule():
    """clip to [0, 1], x 255, round to nearest (VaeImageProcessor.numpy_to_pil), channels last."""
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 254.4 / 255, 1.0, 1.7, -0.3]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 1, 254, 255, 255, 0]


@pytest.mark.gpu
def test_parity_meissonic_forward_has_no_host_sync(models, vectors):
    """On a GPU, a bf16 forward (inputs already on the device) asks nothing of the host: no .item(), no
    data-dependent shapes, no copies back (torch's sync debug mode turns any into an error)."""
    model = models["downsample"]
    gpu = MeissonicTransformer(model.config)
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16).eval()
    args = [_vec(vectors, k).to("cuda") for k in ("downsample/codes", "downsample/micro_conds", "pooled",
                                                   "encoder_hidden_states", "downsample/timestep")]
    with torch.no_grad():
        gpu(*args)                          # the rotary tables are made once per grid and cached
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = gpu(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == torch.bfloat16 and out.shape == _vec(vectors, "downsample/logits").shape
