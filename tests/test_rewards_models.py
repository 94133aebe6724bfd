"""Model rewards on tiny random models of their real architectures, saved and loaded back through the real loaders."""
import shutil

import pytest
import torch
from PIL import Image

from policy.weights import CheckpointError
from rewards.base import build_reward
from benchmarks.tiny_models import make_tiny_aesthetic_mlp, make_tiny_open_clip, make_tiny_pickscore

PROMPTS = ["a photo of a cat", "a red car on a street", "two dogs", "a blue fire hydrant", "an apple"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_rewards")
    cfg, ckpt = make_tiny_open_clip(d / "clip")
    _, hps = make_tiny_open_clip(d / "hps", wrap_key="state_dict", filename="HPS_v2_compressed.pt", seed=1)
    qcfg, qckpt = make_tiny_open_clip(d / "l14", name="tiny-clip-quickgelu", quick_gelu=True, seed=2)
    # the aesthetic head has no activations: with default init its output barely moves (spread ~0.002), so its
    # weights are scaled x4 per layer to make the scores spread (~2) and differences visible
    mlp = make_tiny_aesthetic_mlp(d / "aesthetic.pth", input_size=32)
    sd = torch.load(mlp, weights_only=True)
    torch.save({k: v * 4 if k.endswith("weight") else v for k, v in sd.items()}, mlp)
    pick_model, pick_proc = make_tiny_pickscore(d / "pick")
    return {"dir": d, "cfg": cfg, "ckpt": ckpt, "hps": hps, "qcfg": qcfg, "qckpt": qckpt, "mlp": mlp,
            "pick_model": pick_model, "pick_proc": pick_proc}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(5, 3, 12, 16, generator=g)
    return (torch.nn.functional.interpolate(base, (96, 128), mode="bilinear") * 255).round().to(torch.uint8) \
        .permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def noisy():
    """Pixel noise at 96x128: sharp detail, so that the resize filter (bicubic vs bilinear, antialiasing) shows."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (5, 96, 128, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def native(images):
    """64x64 crops: the tiny models' input size, so no pipeline resizes and every score must match exactly."""
    return images[:, 16:80, 32:96].contiguous()


def _specs(t):
    return {
        "clip_score": {"name": "clip_score", "path": t["ckpt"], "model_config": t["cfg"], "batch_size": 2},
        "hpsv2": {"name": "hpsv2", "path": t["hps"], "model_config": t["cfg"]},
        "pickscore": {"name": "pickscore", "path": t["pick_model"], "processor_path": t["pick_proc"]},
        "aesthetic": {"name": "aesthetic", "path": t["mlp"], "clip_path": t["qckpt"], "clip_model_config": t["qcfg"],
                      "input_size": 32},
    }


def _open_clip_model(cfg, ckpt, key=None, quick_gelu=False):
    import open_clip
    open_clip.add_model_config(cfg)
    name = cfg.rsplit("/", 1)[-1][:-5]
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    sd = torch.load(ckpt, weights_only=True)
    model.load_state_dict(sd[key] if key else sd)
    return model.eval(), open_clip.get_tokenizer(name)


@torch.no_grad()
def _library_scores(t, name, images):
    """Each reward computed by its libraries' own code: open_clip's PIL transforms and forward, transformers'
    CLIPProcessor and CLIPModel (PickScore = logits_per_image), the aesthetic head on open_clip's embedding."""
    from open_clip.transform import image_transform
    pil = [Image.fromarray(im.numpy()) for im in images]
    if name == "clip_score":                       # CLIP: shortest side + centre crop; logits_per_image
        model, tok = _open_clip_model(t["cfg"], t["ckpt"])
        x = torch.stack([image_transform(64, is_train=False)(p) for p in pil])
        f_img, f_txt, scale = model(x, tok(PROMPTS))
        return scale * (f_img * f_txt).sum(-1)
    if name == "hpsv2":                            # HPSv2: longest side + black padding; cosine, no logit scale
        model, tok = _open_clip_model(t["cfg"], t["hps"], key="state_dict")
        x = torch.stack([image_transform(64, is_train=False, resize_mode="longest", fill_color=0)(p) for p in pil])
        f_img, f_txt, _ = model(x, tok(PROMPTS))
        return (f_img * f_txt).sum(-1)
    if name == "pickscore":
        from transformers import CLIPModel, CLIPProcessor
        model = CLIPModel.from_pretrained(t["pick_model"]).eval()
        proc = CLIPProcessor.from_pretrained(t["pick_proc"])
        inputs = proc(images=pil, text=PROMPTS, padding="max_length", truncation=True, max_length=77,
                      return_tensors="pt")
        return model(**inputs).logits_per_image.diagonal()
    if name == "aesthetic":                        # MLP(normalised OpenAI-CLIP image embedding)
        from rewards.aesthetic import AestheticMLP
        model, _ = _open_clip_model(t["qcfg"], t["qckpt"], quick_gelu=True)
        mlp = AestheticMLP(32)
        mlp.load_state_dict(torch.load(t["mlp"], weights_only=True))
        x = torch.stack([image_transform(64, is_train=False)(p) for p in pil])
        return mlp.eval()(model.encode_image(x, normalize=True)).squeeze(-1)
    raise KeyError(name)


NAMES = ["clip_score", "hpsv2", "pickscore", "aesthetic"]


@pytest.mark.parametrize("name", NAMES)
def test_reward_equals_its_library_at_the_model_input_size(tiny, native, name):
    """No resizing involved: our batched tensor pipeline must give the library's numbers to float precision."""
    r = build_reward(_specs(tiny)[name])
    out = r.score(native, PROMPTS)
    assert out.scores.shape == (5,) and out.scores.dtype == torch.float32
    ref = _library_scores(tiny, name, native)
    assert ref.max() - ref.min() > 0.1                         # the scores depend on the image/prompt pairs
    torch.testing.assert_close(out.scores, ref.float(), rtol=1e-5, atol=1e-5)
    # micro-batching does not change scores
    r.batch_size = 3
    torch.testing.assert_close(r.score(native, PROMPTS).scores, out.scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_reward_follows_its_library_through_resizing(tiny, noisy, name):
    """Noise images at 96x128, resized to 64: our antialiased tensor resize differs from PIL's by rounding only.
    Measured: at most 0.45 % of the spread of the five scores (clip 0.15 %, hps 0.04 %, pick 0.34 %); a bilinear
    instead of a bicubic filter gives 2.2 % (clip), a squash instead of a centre crop 11 %, no normalisation 20 %."""
    ours = build_reward(_specs(tiny)[name]).score(noisy, PROMPTS).scores
    ref = _library_scores(tiny, name, noisy).float()
    spread = float(ref.max() - ref.min())
    assert spread > 0.05
    assert float((ours - ref).abs().max()) < 0.01 * spread, (ours, ref)


def test_clip_score_scales(tiny, images):
    spec = _specs(tiny)["clip_score"]
    cos = build_reward({**spec, "scale": "cosine"}).score(images, PROMPTS).scores
    x100 = build_reward({**spec, "scale": "x100"}).score(images, PROMPTS).scores
    logit = build_reward(spec).score(images, PROMPTS).scores
    assert cos.abs().max() <= 1
    torch.testing.assert_close(x100, 100 * cos, rtol=1e-6, atol=1e-5)
    # open_clip initialises logit_scale = log(1 / 0.07)
    torch.testing.assert_close(logit, cos / 0.07, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        build_reward({**spec, "scale": "bogus"})


def test_aesthetic_head_layout(tiny):
    from rewards.aesthetic import AestheticMLP
    mlp = AestheticMLP(32)
    assert sorted(mlp.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert sorted(torch.load(tiny["mlp"], weights_only=True)) == sorted(mlp.state_dict())


def test_open_clip_tokenizers_work_offline():
    import open_clip
    for arch in ("ViT-H-14", "ViT-L-14"):
        tokens = open_clip.get_tokenizer(arch)(["a photo of a red car"])
        assert tokens.shape == (1, 77) and tokens[0, 0] == 49406


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,expected", [("hpsv2", "HPS_v2_compressed.pt"), ("clip_score", "open_clip"),
                                           ("pickscore", "PickScore_v1"), ("aesthetic", "sac\\+logos")])
def test_missing_checkpoint_says_what_is_expected(tiny, tmp_path, name, expected):
    spec = dict(_specs(tiny)[name], path=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match=f"not found; expected .*{expected}"):
        build_reward(spec)


def test_hpsv2_without_state_dict_key(tiny, tmp_path):
    sd = torch.load(tiny["hps"], weights_only=True)["state_dict"]
    torch.save({"model": sd}, tmp_path / "hps.pt")
    with pytest.raises(CheckpointError, match="no entry 'state_dict'"):
        build_reward(dict(_specs(tiny)["hpsv2"], path=str(tmp_path / "hps.pt")))


def test_checkpoint_of_another_architecture(tiny, tmp_path):
    _, other = make_tiny_open_clip(tmp_path, name="tiny-clip-other", embed_dim=16)
    with pytest.raises(CheckpointError, match="checkpoint shape"):
        build_reward(dict(_specs(tiny)["clip_score"], path=other))
    with pytest.raises(CheckpointError, match="aesthetic MLP"):   # MLP for 768-d embeddings, CLIP gives 32
        build_reward(dict(_specs(tiny)["aesthetic"], path=make_tiny_aesthetic_mlp(tmp_path / "big.pth", 768)))


def test_corrupted_checkpoint(tiny, tmp_path):
    bad = tmp_path / "HPS_v2_compressed.pt"
    bad.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        build_reward(dict(_specs(tiny)["hpsv2"], path=str(bad)))


def test_pickscore_missing_or_mismatched_weights(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "pick"
    shutil.copytree(tiny["pick_model"], d)
    sd = load_file(str(d / "model.safetensors"))
    sd.pop(sorted(k for k in sd if k.startswith("vision_model."))[0])
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing keys"):
        build_reward(dict(_specs(tiny)["pickscore"], path=str(d)))
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        build_reward(dict(_specs(tiny)["pickscore"], path=str(d)))


def test_unknown_arch(tiny):
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        build_reward({"name": "clip_score", "path": tiny["ckpt"], "arch": "ViT-Q-99"})
