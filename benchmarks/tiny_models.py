"""Tiny random models of the real architectures, for benchmarks and tests: Show-o at toy sizes (and groups sampled
from it), and the reward models (open_clip, the aesthetic MLP, PickScore's CLIP, Mask2Former) saved in their
real formats at toy sizes. No weights are downloaded: everything is randomly initialised and seeded."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from policy.sampler import SamplerConfig, UnmaskingSampler
from policy.showo import PhiArch, Showo, ShowoConfig
from policy.trajectory import Trajectory
from rewards.openclip import create_open_clip


# ---------------------------------------------------------------------------------------------- Show-o

def tiny_showo_config(hidden: int = 64, layers: int = 2, heads: int = 4, num_vq_tokens: int = 16,
                      codebook_size: int = 64, max_seq_length: int = 16) -> ShowoConfig:
    """The fixtures' tiny layout (text vocab 100, ten specials, bos = eos = 99) at a chosen size."""
    return ShowoConfig(vocab_size=100 + 10 + codebook_size + 1, llm_vocab_size=100, codebook_size=codebook_size,
                       num_vq_tokens=num_vq_tokens, num_new_special_tokens=10, max_seq_length=max_seq_length,
                       bos_id=99, eos_id=99,
                       phi=PhiArch(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, max_position_embeddings=512))


def random_showo(seed: int = 0, config: Optional[ShowoConfig] = None, std: float = 0.2) -> Showo:
    """A Show-o with seeded random weights (normal(0, std) matrices, so that its predictions are not flat)."""
    gen = torch.Generator().manual_seed(seed)
    model = Showo(config or tiny_showo_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def sample_groups(model: Showo, num_groups: int, group_size: int, steps: int, seed: int = 0) -> tuple[
        list[Trajectory], list[str]]:
    """`num_groups` groups of `group_size` rollouts (one prompt each) with the batched sampler, and the
    prompts' names. Prompt g's text is a few token ids derived from g."""
    sampler = UnmaskingSampler(model, SamplerConfig(steps=steps))
    trajs, prompts = [], []
    for g in range(num_groups):
        text = [(7 * g + j) % 90 + 1 for j in range(3 + g % 4)]
        area = {"ids": model.layout.text_area([text])}
        tr = sampler.sample(area, [seed * 100_003 + g * 1_000 + i for i in range(group_size)], group_size)
        tr.meta["group_id"] = g
        trajs.append(tr)
        prompts.append(f"prompt {g}")
    return trajs, prompts


# ---------------------------------------------------------------------------------------------- reward models

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
