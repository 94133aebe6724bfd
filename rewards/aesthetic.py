"""LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding (AVA 1-10 scale)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from policy.device import resolve_device
from policy.weights import load_strict, read_state_dict
from rewards.base import Reward, register_reward
from rewards.openclip import encode_image, load_open_clip, model_device_dtype, open_clip_image_cfg, require_path
from rewards.preprocess import clip_preprocess


class AestheticMLP(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts 0.2, 0.2, 0.1 and no activations (keys layers.{0,2,4,6,7})."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_reward("aesthetic")
class Aesthetic(Reward):
    """``path``: the MLP (``sac+logos+ava1-l14-linearMSE.pth``, saved on CUDA: loaded to CPU); ``clip_path``: an
    open_clip ViT-L-14 checkpoint of OpenAI's CLIP weights (hence ``quick_gelu=True`` by default)."""

    def __init__(self, path: str, clip_path: str, clip_arch: str = "ViT-L-14", quick_gelu: bool = True,
                 clip_model_config: str | dict | None = None, input_size: int = 768, device: Optional[str] = None,
                 dtype: Optional[str] = None, batch_size: int = 32):
        p = require_path(path, "aesthetic", "the LAION aesthetic MLP (sac+logos+ava1-l14-linearMSE.pth)")
        self.clip, _ = load_open_clip(clip_arch, clip_path, "aesthetic (CLIP)", quick_gelu=quick_gelu,
                                      expected=f"an open_clip {clip_arch} checkpoint of OpenAI's CLIP weights",
                                      model_config=clip_model_config, device=device, dtype=dtype)
        embed_dim = getattr(self.clip.visual, "output_dim", None)
        if embed_dim is not None and embed_dim != input_size:
            raise ValueError(f"aesthetic: CLIP embeddings have {embed_dim} dims but the MLP takes {input_size}")
        self.mlp = AestheticMLP(input_size)
        load_strict(self.mlp, read_state_dict(p), "aesthetic MLP")
        self.mlp.to(resolve_device(device)).eval().requires_grad_(False)
        self.size, self.mean, self.std = open_clip_image_cfg(self.clip)
        self.batch_size = batch_size

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        device, dtype = model_device_dtype(self.clip)
        emb = encode_image(self.clip, clip_preprocess(images, self.size, self.mean, self.std, device, dtype))
        return self.mlp(emb).squeeze(-1)
