"""Test and benchmark helpers: tiny randomly initialised reward models saved in their real formats, test-only
rewards (constant, pixel mean, flaky via a flag file, NaN) and a toy code decoder.

Nothing here is registered by name: use import paths, e.g. ``{"name": "rewards.testing:FlakyReward", ...}``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from rewards.base import Reward, RewardOutput
from rewards.openclip import create_open_clip

TINY_CLIP_NAME = "tiny-clip-test"


# ---------------------------------------------------------------------------------------------- tiny models

def tiny_open_clip_config(embed_dim: int = 32, image_size: int = 64, width: int = 32) -> dict:
    """An open_clip model config (ViT image tower + text transformer) small enough for CPU tests."""
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": 1, "width": width, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1}}


def make_tiny_open_clip(directory: str | os.PathLike, name: str = TINY_CLIP_NAME, quick_gelu: bool = False,
                        wrap_key: Optional[str] = None, filename: str = "open_clip_pytorch_model.bin",
                        seed: int = 0, **cfg) -> tuple[str, str]:
    """Write ``<name>.json`` (model config) and a random checkpoint; return (config path, checkpoint path).

    `wrap_key` nests the state dict (HPSv2 files hold ``{"state_dict": ...}``).
    """
    import open_clip
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg_path = d / f"{name}.json"
    cfg_path.write_text(json.dumps(tiny_open_clip_config(**cfg)))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = create_open_clip(name, quick_gelu)
    sd = model.state_dict()
    ckpt = d / filename
    torch.save({wrap_key: sd} if wrap_key else sd, ckpt)
    return str(cfg_path), str(ckpt)


def make_tiny_aesthetic_mlp(path: str | os.PathLike, input_size: int = 32, seed: int = 0) -> str:
    from rewards.aesthetic import AestheticMLP
    torch.manual_seed(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(AestheticMLP(input_size).state_dict(), path)
    return str(path)


def clip_tokenizer():
    """A transformers CLIPTokenizer with CLIP's BPE, built from the vocabulary bundled with open_clip (offline)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    tok = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in tok.encoder.items()}
    merges = [m for m, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def make_tiny_clip_processor(directory: str | os.PathLike, image_size: int = 64) -> str:
    """Save a CLIPProcessor (CLIP BPE tokenizer + CLIP image processor at `image_size`) to `directory`."""
    from transformers import CLIPImageProcessor, CLIPProcessor
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=ip, tokenizer=clip_tokenizer()).save_pretrained(str(directory))
    return str(directory)


def make_tiny_pickscore(directory: str | os.PathLike, image_size: int = 64, seed: int = 0,
                        full: bool = False) -> tuple[str, str]:
    """Save a random transformers CLIPModel (+ processor); `full` uses the ViT-H-14 sizes of PickScore_v1."""
    from transformers import CLIPConfig, CLIPModel
    d = Path(directory)
    if full:
        text = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                    hidden_act="gelu")
        vision = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                      patch_size=14, image_size=224, hidden_act="gelu")
        proj, image_size = 1024, 224
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
        vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                      patch_size=16, image_size=image_size)
        proj = 32
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **text),
                     vision_config=vision, projection_dim=proj)
    CLIPModel(cfg).save_pretrained(str(d / "model"))
    return str(d / "model"), make_tiny_clip_processor(d / "processor", image_size)


def make_tiny_mask2former(directory: str | os.PathLike, num_labels: int = 80, seed: int = 0) -> str:
    """Save a random, tiny transformers Mask2Former (Swin backbone) for instance segmentation."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from rewards.geneval import COCO_CLASSES
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    names = COCO_CLASSES if num_labels == len(COCO_CLASSES) else [f"class{i}" for i in range(num_labels)]
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, hidden_dim=32, num_queries=8,
                            encoder_layers=1, decoder_layers=2, feature_size=32, mask_feature_size=32,
                            encoder_feedforward_dim=64, dim_feedforward=64, num_attention_heads=2,
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(str(directory))
    return str(directory)


# ---------------------------------------------------------------------------------------------- test rewards

class ConstantReward(Reward):
    """Every sample scores `value`. The test rewards take the reward actor's `device` option and compute on the
    CPU whatever it says (they are arithmetic on a few numbers)."""

    def __init__(self, value: float = 1.0, batch_size: Optional[int] = None, device: Optional[str] = None):
        self.value, self.batch_size = float(value), batch_size

    def _score(self, images, prompts, metadata):
        return torch.full((images.shape[0],), self.value)


class PixelMeanReward(Reward):
    """Mean pixel value in [0, 1] (a cheap deterministic image function); details: the prompt length."""

    def __init__(self, device: Optional[str] = None):
        pass

    def _score(self, images, prompts, metadata):
        return RewardOutput(images.float().mean(dim=(1, 2, 3)) / 255.0,
                            details={"prompt_len": torch.tensor([float(len(p)) for p in prompts])})


class FlakyReward(PixelMeanReward):
    """Raises once while `flag_file` exists (deleting it), then scores normally: a one-off injected failure.
    With ``crash: true`` it kills its process instead of raising (an actor death)."""

    def __init__(self, flag_file: str, crash: bool = False, device: Optional[str] = None):
        self.flag_file, self.crash = flag_file, crash

    def _score(self, images, prompts, metadata):
        if os.path.exists(self.flag_file):
            os.remove(self.flag_file)
            if self.crash:
                os._exit(1)
            raise RuntimeError(f"injected failure (flag file {self.flag_file})")
        return super()._score(images, prompts, metadata)


class FailingReward(Reward):
    """Always raises."""

    def __init__(self, device: Optional[str] = None):
        pass

    def _score(self, images, prompts, metadata):
        raise RuntimeError("this reward always fails")


class NaNReward(PixelMeanReward):
    """Returns NaN for sample `index` of each batch."""

    def __init__(self, index: int = 0, device: Optional[str] = None):
        self.index = index

    def _score(self, images, prompts, metadata):
        s = super()._score(images, prompts, metadata).scores
        s[self.index] = float("nan")
        return s


def make_palette_decoder(height: int = 32, width: int = 32, codebook: int = 16) -> Callable[[torch.Tensor], torch.Tensor]:
    """A toy decoder factory: codes long [B,N] (N a square) -> uint8 [B,H,W,3], each code a flat colour patch."""
    g = torch.Generator().manual_seed(0)
    palette = torch.randint(0, 256, (codebook, 3), generator=g, dtype=torch.uint8)

    def decode(codes: torch.Tensor) -> torch.Tensor:
        b, n = codes.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"palette decoder needs a square number of codes, got {n}")
        grid = palette[codes.long() % codebook].view(b, side, side, 3).permute(0, 3, 1, 2).float()
        img = torch.nn.functional.interpolate(grid, size=(height, width), mode="nearest")
        return img.permute(0, 2, 3, 1).to(torch.uint8).contiguous()
    return decode
