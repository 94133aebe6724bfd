"""Tensor preprocessing matches the original PIL-based processors (open_clip, HPSv2, transformers CLIP)."""
import numpy as np
import pytest
import torch
from PIL import Image

from rewards.preprocess import (OPENAI_STD, clip_preprocess, detector_preprocess, hps_preprocess,
                                rescale_keep_ratio_size, resize_longest_side_and_pad, to_float)

STEP = 1.0 / 255 / min(OPENAI_STD)  # one uint8 step in normalised units


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, max(h // 8, 1), max(w // 8, 1), generator=g)
    img = torch.nn.functional.interpolate(base, (h, w), mode="bilinear") * 255
    return img.round().to(torch.uint8)[0].permute(1, 2, 0).contiguous()


@pytest.mark.parametrize("hw", [(512, 512), (300, 420), (500, 333), (96, 128)])
def test_clip_and_hps_match_open_clip_transforms(hw):
    from open_clip.transform import image_transform
    img = _image(*hw)
    pil = Image.fromarray(img.numpy())
    ref = image_transform(224, is_train=False)(pil)
    ours = clip_preprocess(img[None])[0]
    # PIL's fixed-point filters differ from float interpolation by at most one uint8 step on a few pixels
    assert (ref - ours).abs().max() <= STEP * 1.01
    assert (ref - ours).abs().mean() < 0.2 * STEP
    ref_hps = image_transform(224, is_train=False, resize_mode="longest", fill_color=0)(pil)
    ours_hps = hps_preprocess(img[None])[0]
    assert ours_hps.shape == (3, 224, 224)
    assert (ref_hps - ours_hps).abs().max() <= STEP * 1.01
    assert (ref_hps - ours_hps).abs().mean() < 0.2 * STEP


def test_clip_matches_transformers_clip_image_processor():
    from transformers import CLIPImageProcessor
    img = _image(300, 420, seed=1)
    ip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ref = torch.as_tensor(np.asarray(ip(Image.fromarray(img.numpy()), return_tensors="np")["pixel_values"][0]))
    ours = clip_preprocess(img[None])[0]
    assert (ref - ours).abs().max() <= STEP * 1.01


def test_hps_pads_with_black_not_crop():
    img = torch.full((1, 100, 200, 3), 255, dtype=torch.uint8)
    x = resize_longest_side_and_pad(to_float(img), 224)
    assert x.shape == (1, 3, 224, 224)
    assert torch.all(x[..., :56, :] == 0) and torch.all(x[..., 168:, :] == 0)   # 112 rows of image, centred
    assert torch.allclose(x[..., 56:168, :], torch.ones(1))
    y = hps_preprocess(img)
    assert torch.allclose(y[0, :, 0, 0], -torch.tensor([0.48145466, 0.4578275, 0.40821073]) / torch.tensor(OPENAI_STD))


def test_batched_equals_single():
    imgs = torch.stack([_image(128, 96, seed=s) for s in range(3)])
    batched = clip_preprocess(imgs, 64)
    for i in range(3):
        assert torch.allclose(batched[i], clip_preprocess(imgs[i:i + 1], 64)[0])


def test_detector_preprocess_keep_ratio_and_padding():
    assert rescale_keep_ratio_size(512, 512, 800, 1333) == (800, 800)
    assert rescale_keep_ratio_size(480, 640, 800, 1333) == (800, 1067)
    assert rescale_keep_ratio_size(200, 1000, 800, 1333) == (267, 1333)
    imgs = torch.zeros(2, 480, 640, 3, dtype=torch.uint8)
    x, mask, valid = detector_preprocess(imgs)
    assert valid == (800, 1067) and x.shape == (2, 3, 800, 1088) and mask.shape == (2, 800, 1088)
    assert mask[:, :, :1067].all() and not mask[:, :, 1067:].any()
