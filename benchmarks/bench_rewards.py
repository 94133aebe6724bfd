"""Throughput of each reward (images/s), on randomly initialised models loaded through the real loaders.

    python benchmarks/bench_rewards.py                 # tiny models, CPU, 256x256 images
    python benchmarks/bench_rewards.py --full          # full-size models (ViT-H-14, ViT-L-14, Swin-S Mask2Former)
                                                       # on CUDA at 512x512; add --allow-cpu to run them on a CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.base import build_reward  # noqa: E402
from benchmarks.tiny_models import (make_tiny_aesthetic_mlp, make_tiny_mask2former, make_tiny_open_clip,  # noqa: E402
                             make_tiny_pickscore)

PROMPTS = ["a photo of a red car", "two dogs on a couch", "a blue fire hydrant", "a cup left of a laptop"]
META = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]},
        {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}]},
        {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                        {"class": "cup", "count": 1, "position": ["left of", 0]}]}]


def tiny_specs(d: Path, only: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """Specs of tiny random reward models written under `d`; with `only`, just the models those rewards need."""
    need = lambda *names: only is None or any(n in only for n in names)  # noqa: E731
    cfg, ckpt = make_tiny_open_clip(d / "clip")
    _, hps = make_tiny_open_clip(d / "hps", wrap_key="state_dict", filename="HPS_v2_compressed.pt") \
        if need("hpsv2") else (None, None)
    qcfg, qckpt = make_tiny_open_clip(d / "l14", name="tiny-clip-quickgelu", quick_gelu=True)
    pm, pp = make_tiny_pickscore(d / "pick") if need("pickscore") else (None, None)
    m2f = make_tiny_mask2former(d / "m2f") if need("geneval") else None
    mlp = make_tiny_aesthetic_mlp(d / "aesthetic.pth", 32) if need("aesthetic") else None
    specs = _specs(ckpt, hps, qckpt, mlp, pm, pp, m2f, {"model_config": cfg}, {"model_config": qcfg}, input_size=32)
    return {k: v for k, v in specs.items() if need(k)}


def _save_open_clip(arch: str, path: Path, quick_gelu: bool, wrap_key: str | None = None) -> str:
    from rewards.openclip import create_open_clip
    sd = {k: v.half() for k, v in create_open_clip(arch, quick_gelu).state_dict().items()}
    torch.save({wrap_key: sd} if wrap_key else sd, path)
    return str(path)


def _save_full_mask2former(path: Path) -> str:
    """Random Mask2Former with the Swin-S sizes of facebook/mask2former-swin-small-coco-instance."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from rewards.geneval import COCO_CLASSES
    backbone = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=80, id2label=dict(enumerate(COCO_CLASSES)),
                            label2id={n: i for i, n in enumerate(COCO_CLASSES)})
    Mask2FormerForUniversalSegmentation(cfg).half().save_pretrained(str(path))
    return str(path)


def full_specs(d: Path) -> dict[str, dict]:
    hps = _save_open_clip("ViT-H-14", d / "HPS_v2_compressed.pt", False, wrap_key="state_dict")
    l14 = _save_open_clip("ViT-L-14", d / "vit_l14_openai.bin", True)
    pm, pp = make_tiny_pickscore(d / "pick", full=True)
    mlp = make_tiny_aesthetic_mlp(d / "aesthetic.pth", 768)
    return _specs(hps, hps, l14, mlp, pm, pp, _save_full_mask2former(d / "m2f"), {"checkpoint_key": "state_dict"},
                  {}, input_size=768)


def _specs(clip, hps, l14, mlp, pm, pp, m2f, clip_extra, l14_extra, input_size) -> dict[str, dict]:
    l14_cfg = {k.replace("model_config", "clip_model_config"): v for k, v in l14_extra.items()}
    return {
        "clip_score": {"name": "clip_score", "path": clip, **clip_extra},
        "hpsv2": {"name": "hpsv2", "path": hps, **{k: v for k, v in clip_extra.items() if k != "checkpoint_key"}},
        "pickscore": {"name": "pickscore", "path": pm, "processor_path": pp},
        "aesthetic": {"name": "aesthetic", "path": mlp, "clip_path": l14, "input_size": input_size, **l14_cfg},
        "geneval": {"name": "geneval", "detector": {"name": "mask2former", "path": m2f},
                    "color_classifier": {"name": "clip", "path": l14, **l14_extra}},
    }


def bench(spec: dict, images: torch.Tensor, iters: int, device: str, dtype: str) -> tuple[float, float]:
    """(load seconds, images/s) after one warm-up batch."""
    spec = dict(spec)
    if spec["name"] == "geneval":
        spec["detector"] = dict(spec["detector"], device=device, dtype=dtype)
        spec["color_classifier"] = dict(spec["color_classifier"], device=device, dtype=dtype)
    else:
        spec.update(device=device, dtype=dtype)
    t0 = time.perf_counter()
    reward = build_reward(spec)
    load_s = time.perf_counter() - t0
    b = images.shape[0]
    prompts, meta = (PROMPTS * b)[:b], (META * b)[:b]
    reward.score(images, prompts, meta)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = reward.score(images, prompts, meta)
    sync()
    assert torch.isfinite(out.scores).all()
    return load_s, iters * b / (time.perf_counter() - t0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full-size random models at 512x512 (needs CUDA)")
    ap.add_argument("--allow-cpu", action="store_true", help="run --full on the CPU anyway (slow)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--size", type=int, default=None, help="image side (default 256 tiny, 512 full)")
    ap.add_argument("--only", nargs="*", default=None, help="reward names to run")
    ap.add_argument("--dtype", default="auto", help="auto = float16 on CUDA, float32 on CPU")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.full and not cuda and not args.allow_cpu:
        print("--full needs CUDA (or --allow-cpu); nothing to do")
        return 0
    device = "cuda" if cuda else "cpu"
    size = args.size or (512 if args.full else 256)
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        specs = full_specs(Path(tmp)) if args.full else tiny_specs(Path(tmp), args.only)
        print(f"# {'full-size' if args.full else 'tiny'} random models written in {time.perf_counter() - t0:.1f} s; "
              f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
              f"batch {args.batch} x {size}x{size}, dtype {args.dtype}")
        print(f"{'reward':<12} {'load s':>8} {'images/s':>10}")
        for name, spec in specs.items():
            if args.only and name not in args.only:
                continue
            load_s, ips = bench(spec, images, args.iters, device, args.dtype)
            print(f"{name:<12} {load_s:>8.2f} {ips:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
