"""PickScore: a transformers CLIPModel fine-tuned on Pick-a-Pic; score = logit_scale.exp() x cosine (about 18-24)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from policy.weights import CheckpointError
from rewards.base import Reward, register_reward
from policy.device import resolve_device
from rewards.openclip import load_hf_pretrained, require_path, resolve_dtype
from rewards.preprocess import PIL_RESAMPLE, clip_preprocess


def _features(out) -> torch.Tensor:
    """transformers 4.x returns a tensor from get_*_features, 5.x an output whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@register_reward("pickscore")
class PickScore(Reward):
    """``path``: a directory with config.json + weights of ``yuvalkirstain/PickScore_v1`` (CLIPModel);
    ``processor_path``: a directory with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (tokenizer
    files + preprocessor_config.json). The image half of the processor (shortest-edge resize, centre crop,
    mean/std) is read from its config and applied on tensors; text is padded/truncated to 77 tokens."""

    def __init__(self, path: str, processor_path: Optional[str] = None, max_length: int = 77,
                 device: Optional[str] = None, dtype: Optional[str] = None, batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor
        self.model = load_hf_pretrained(CLIPModel, path, "pickscore", "a directory with config.json and "
                                        "model.safetensors/pytorch_model.bin of yuvalkirstain/PickScore_v1")
        pp = require_path(processor_path or path, "pickscore (processor)",
                          "a directory with the CLIP processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
        dev = resolve_device(device)
        self.model.to(dev, resolve_dtype(dtype, dev)).eval().requires_grad_(False)
        try:
            processor = CLIPProcessor.from_pretrained(str(pp), local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"pickscore: cannot load the CLIP processor from {str(pp)!r}: {e}") from e
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        crop = ip.crop_size if ip.do_center_crop else ip.size
        self.crop = (crop["height"], crop["width"])
        if ip.size.get("shortest_edge") not in (None, min(self.crop)):
            raise ValueError(f"pickscore: resize {ip.size} and crop {crop} differ; not supported")
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)
        self.mode = PIL_RESAMPLE.get(int(ip.resample), "bicubic")
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        p = next(self.model.parameters())
        pixels = clip_preprocess(images, self.crop, self.mean, self.std, p.device, p.dtype, mode=self.mode)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(p.device)
        img = nn.functional.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        txt = nn.functional.normalize(_features(self.model.get_text_features(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])).float(), dim=-1)
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1)
