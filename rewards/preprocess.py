"""Batched image preprocessing on tensors (no per-image PIL loops).

Inputs are uint8 [B, H, W, 3] images; outputs float [B, 3, h, w]. Resizes use ``F.interpolate`` with
``antialias=True`` for bicubic/bilinear downscaling, which matches PIL's filters (the original CLIP/HPS/PickScore
processors resize PIL images); bicubic overshoot is clamped to [0, 1] as PIL's uint8 output is.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL resample codes used in transformers' processor configs -> interpolate modes
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def to_float(images: torch.Tensor, device: Optional[torch.device | str] = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [0, 1] (moved to `device` first, so the conversion runs there)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B,H,W,3] images, got {images.dtype} {tuple(images.shape)}")
    x = images.to(device) if device is not None else images
    return x.permute(0, 3, 1, 2).to(dtype).div_(255.0)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic", antialias: bool = True,
           quantize: bool = True) -> torch.Tensor:
    """Resize float [B,C,H,W] in [0,1] to `size` (h, w); clamps the bicubic overshoot and (`quantize`) rounds to
    1/255 steps as PIL's uint8 output does."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": antialias}
    # interpolate's antialias path has no fp16/bf16 kernels on every device: resize in float32
    y = F.interpolate(x.float(), size=tuple(size), mode=mode, **kw)
    if mode == "bicubic":
        y = y.clamp_(0.0, 1.0)
    if quantize:  # PIL resizes uint8 images to uint8: round to the same 1/255 steps
        y = y.mul_(255.0).round_().div_(255.0)
    return y.to(x.dtype)


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output (h, w) with the shorter side `size` and the longer side truncated as torchvision/transformers do."""
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if h <= w else (new_long, new_short)


def resize_shortest_side(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    return resize(x, shortest_side_size(x.shape[-2], x.shape[-1], size), mode)


def center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Centre crop (torchvision's rounding); pads with zeros first if the image is smaller."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x[..., top:top + th, left:left + tw]


def resize_longest_side_and_pad(x: torch.Tensor, size: int, fill: float = 0.0, mode: str = "bicubic") -> torch.Tensor:
    """HPSv2's transform: scale the longest side to `size`, then pad to a `size` square (centred) with `fill`.

    Padding happens in pixel space (before normalisation), so black padding becomes -mean/std afterwards.
    """
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = resize(x, (nh, nw), mode)
    h, w = x.shape[-2:]
    ph, pw = size - h, size - w
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def clip_preprocess(images: torch.Tensor, size: int | tuple[int, int] = 224, mean: Sequence[float] = OPENAI_MEAN,
                    std: Sequence[float] = OPENAI_STD, device: Optional[torch.device | str] = None,
                    dtype: torch.dtype = torch.float32, mode: str = "bicubic") -> torch.Tensor:
    """CLIP's transform: resize the shortest side to `size` (bicubic), centre crop, normalise."""
    crop = (size, size) if isinstance(size, int) else tuple(size)
    x = resize_shortest_side(to_float(images, device), min(crop), mode)
    return normalize(center_crop(x, crop), mean, std).to(dtype)


def clip_preprocess_float(x: torch.Tensor, size: int | tuple[int, int] = 224, mean: Sequence[float] = OPENAI_MEAN,
                          std: Sequence[float] = OPENAI_STD, mode: str = "bicubic") -> torch.Tensor:
    """`clip_preprocess` for float [B,3,H,W] in [0,1] (e.g. crops already on the device)."""
    crop = (size, size) if isinstance(size, int) else tuple(size)
    x = resize_shortest_side(x, min(crop), mode)
    return normalize(center_crop(x, crop), mean, std)


def hps_preprocess(images: torch.Tensor, size: int = 224, mean: Sequence[float] = OPENAI_MEAN,
                   std: Sequence[float] = OPENAI_STD, device: Optional[torch.device | str] = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HPSv2's transform: longest side to `size` (bicubic), pad to a square with black, normalise."""
    x = resize_longest_side_and_pad(to_float(images, device), size, fill=0.0)
    return normalize(x, mean, std).to(dtype)


def rescale_keep_ratio_size(h: int, w: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """mmdet's keep-ratio rescale: the largest scale with short side <= shortest_edge and long <= longest_edge."""
    scale = min(longest_edge / max(h, w), shortest_edge / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def detector_preprocess(images: torch.Tensor, shortest_edge: int = 800, longest_edge: int = 1333,
                        size_divisor: int = 32, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, device: Optional[torch.device | str] = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """mmdet-style detector input: keep-ratio resize (bilinear), normalise, zero-pad to a multiple of `size_divisor`.

    Returns (pixel_values [B,3,Hp,Wp], pixel_mask long [B,Hp,Wp] with 1 on real pixels, valid (h, w)).
    """
    x = to_float(images, device)
    h, w = rescale_keep_ratio_size(x.shape[-2], x.shape[-1], shortest_edge, longest_edge)
    x = normalize(resize(x, (h, w), "bilinear", antialias=False), mean, std)
    hp = -(-h // size_divisor) * size_divisor if size_divisor else h
    wp = -(-w // size_divisor) * size_divisor if size_divisor else w
    x = F.pad(x, (0, wp - w, 0, hp - h))
    mask = torch.zeros(x.shape[0], hp, wp, dtype=torch.long, device=x.device)
    mask[:, :h, :w] = 1
    return x.to(dtype), mask, (h, w)
