"""CLIP score: similarity of open_clip image and text embeddings (the released Mask-GRPO trainer's reward)."""
from __future__ import annotations

from typing import Optional

import torch

from rewards.base import Reward, register_reward
from rewards.openclip import encode_image, encode_text, load_open_clip, model_device_dtype, open_clip_image_cfg
from rewards.preprocess import clip_preprocess

SCALES = ("cosine", "x100", "logit")


@register_reward("clip_score")
class ClipScore(Reward):
    """open_clip CLIP score with CLIP's centre-crop preprocessing.

    ``scale`` picks the output: "cosine" (cos of the normalised embeddings, about 0.1-0.4), "x100" (100 x cosine,
    the usual CLIPScore units) or "logit" (the model's ``logit_scale.exp()`` x cosine, i.e. ``logits_per_image``
    as the released trainer used; 100 x cosine for trained LAION/OpenAI models, whose logit scale saturates at 100).
    """

    def __init__(self, path: str, arch: str = "ViT-H-14", scale: str = "logit", model_config: str | dict | None = None,
                 quick_gelu: bool = False, device: Optional[str] = None, dtype: Optional[str] = None,
                 batch_size: int = 32, checkpoint_key: Optional[str] = None):
        if scale not in SCALES:
            raise ValueError(f"clip_score: scale must be one of {SCALES}, got {scale!r}")
        self.model, self.tokenizer = load_open_clip(
            arch, path, "clip_score", expected=f"an open_clip {arch} checkpoint (e.g. open_clip_pytorch_model.bin)",
            key=checkpoint_key, model_config=model_config, quick_gelu=quick_gelu, device=device, dtype=dtype)
        self.size, self.mean, self.std = open_clip_image_cfg(self.model)
        self.scale = scale
        self.batch_size = batch_size

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        device, dtype = model_device_dtype(self.model)
        img = encode_image(self.model, clip_preprocess(images, self.size, self.mean, self.std, device, dtype))
        txt = encode_text(self.model, self.tokenizer, prompts)
        cos = (img * txt).sum(-1)
        if self.scale == "x100":
            return 100.0 * cos
        if self.scale == "logit":
            return self.model.logit_scale.float().exp() * cos
        return cos
