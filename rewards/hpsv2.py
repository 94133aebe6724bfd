"""HPSv2 / HPSv2.1: open_clip ViT-H-14 fine-tuned on human preferences; score = cosine(image, text)."""
from __future__ import annotations

from typing import Optional

import torch

from rewards.base import Reward, register_reward
from rewards.openclip import encode_image, encode_text, load_open_clip, model_device_dtype, open_clip_image_cfg
from rewards.preprocess import hps_preprocess


@register_reward("hpsv2")
class HPSv2(Reward):
    """Human Preference Score v2 / v2.1.

    ``path``: ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` (an open_clip ViT-H-14 state dict under the
    key ``state_dict``). Preprocessing: longest side to 224 (bicubic), padded to a square with black, OpenAI
    mean/std (not a centre crop). Score = cosine of the normalised embeddings, no logit scale (about 0.15-0.33;
    HPS tables show x100). v2 and v2.1 scores are not comparable.
    """

    def __init__(self, path: str, arch: str = "ViT-H-14", model_config: str | dict | None = None,
                 checkpoint_key: str = "state_dict", device: Optional[str] = None, dtype: Optional[str] = None,
                 batch_size: int = 32):
        self.model, self.tokenizer = load_open_clip(
            arch, path, "hpsv2", expected="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (a dict whose "
                                          f"'{checkpoint_key}' is an open_clip {arch} state dict)",
            key=checkpoint_key, model_config=model_config, device=device, dtype=dtype)
        self.size, self.mean, self.std = open_clip_image_cfg(self.model)
        self.batch_size = batch_size

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        device, dtype = model_device_dtype(self.model)
        pixels = hps_preprocess(images, self.size[0], self.mean, self.std, device, dtype)
        return (encode_image(self.model, pixels) * encode_text(self.model, self.tokenizer, prompts)).sum(-1)
