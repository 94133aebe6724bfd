"""COCO instance detector for GenEval on real images: transformers Mask2Former, post-processed like mmdet.

GenEval's detector is mmdet's Mask2Former Swin-S; transformers' ``facebook/mask2former-swin-small-coco-instance``
has the same 80 classes in the same order (another training run). Preprocessing mimics mmdet (keep-ratio resize
to shortest edge 800 / longest 1333, ImageNet mean/std, pad to a multiple of 32) instead of transformers' 384x384
squash. Post-processing mimics mmdet's ``instance_postprocess``: top 100 (query, class) pairs by class
probability, binary masks at logit > 0, score = class probability x mean mask probability inside the mask, box =
the mask's extent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from policy.weights import CheckpointError
from rewards.detectors import register_detector
from rewards.geneval import COCO_CLASSES
from policy.device import resolve_device
from rewards.openclip import load_hf_pretrained, resolve_dtype
from rewards.preprocess import IMAGENET_MEAN, IMAGENET_STD, detector_preprocess
from rewards.types import Detection


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) of bool masks [K,H,W], x1/y1 exclusive (last pixel + 1); empty masks -> zeros."""
    k, h, w = masks.shape
    boxes = torch.zeros(k, 4, dtype=torch.float32, device=masks.device)
    if k == 0:
        return boxes
    x_any, y_any = masks.any(1), masks.any(2)
    nonempty = x_any.any(1)
    x0 = x_any.float().argmax(1)
    x1 = w - x_any.flip(1).float().argmax(1)
    y0 = y_any.float().argmax(1)
    y1 = h - y_any.flip(1).float().argmax(1)
    boxes[nonempty] = torch.stack([x0, y0, x1, y1], 1).float()[nonempty]
    return boxes


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, input_hw: tuple[int, int],
                         valid_hw: tuple[int, int], out_hw: tuple[int, int], max_per_image: int = 100,
                         min_score: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's (labels, scores, boxes, masks) from Mask2Former logits, as mmdet computes them.

    class_logits [Q, C+1] (last = no object); mask_logits [Q, h, w] at 1/4 of the padded input `input_hw`;
    `valid_hw` the resized image inside the padding; `out_hw` the original image size. Pairs whose class
    probability is below `min_score` are dropped before the masks are upsampled (their score cannot reach it).
    """
    probs = class_logits.float().softmax(-1)[:, :-1]
    q, c = probs.shape
    cls_scores, idx = probs.flatten().topk(min(max_per_image, q * c))
    keep = cls_scores >= min_score
    cls_scores, idx = cls_scores[keep], idx[keep]
    labels, queries = idx % c, idx // c
    if idx.numel() == 0:
        h, w = out_hw
        return labels, cls_scores, torch.zeros(0, 4), torch.zeros(0, h, w, dtype=torch.bool)
    uq, inv = queries.unique(return_inverse=True)
    m = F.interpolate(mask_logits[uq].float()[None], size=tuple(input_hw), mode="bilinear", align_corners=False)
    m = m[..., :valid_hw[0], :valid_hw[1]]
    m = F.interpolate(m, size=tuple(out_hw), mode="bilinear", align_corners=False)[0][inv]
    binary = m > 0
    mask_scores = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = cls_scores * mask_scores
    keep = scores >= min_score
    return labels[keep], scores[keep], masks_to_boxes(binary[keep]), binary[keep]


def _class_names(class_names: Optional[Sequence[str] | str]) -> tuple[str, ...]:
    if class_names is None:
        return COCO_CLASSES
    if isinstance(class_names, str):
        p = Path(class_names)
        if not p.is_file():
            raise FileNotFoundError(f"class-name file {class_names!r} not found (one name per line, label order)")
        return tuple(line.strip() for line in p.read_text().splitlines() if line.strip())
    return tuple(class_names)


@register_detector("mask2former")
class Mask2FormerDetector:
    """``path``: a directory with config.json + weights of a transformers Mask2Former COCO instance model.

    Labels are named by ``class_names`` (GenEval's spelling of the 80 COCO classes by default, in label order; a
    list or a path to object_names.txt), not by the checkpoint's id2label. Only detections scoring >= ``min_score``
    are returned (the GenEval engine applies its own 0.3 / 0.9 thresholds on top).
    """

    def __init__(self, path: str, class_names: Optional[Sequence[str] | str] = None, shortest_edge: int = 800,
                 longest_edge: int = 1333, size_divisor: int = 32, max_per_image: int = 100, min_score: float = 0.3,
                 device: Optional[str] = None, dtype: Optional[str] = None, batch_size: int = 4):
        import importlib.util
        if importlib.util.find_spec("scipy") is None:   # transformers builds Mask2Former's (training) loss with it
            raise ImportError("mask2former: transformers' Mask2Former needs scipy: pip install scipy")
        from transformers import Mask2FormerForUniversalSegmentation
        self.model = load_hf_pretrained(Mask2FormerForUniversalSegmentation, path, "mask2former",
                                        "a directory with config.json and model.safetensors of a transformers "
                                        "Mask2Former COCO instance model (facebook/mask2former-swin-small-coco-instance)")
        self.class_names = _class_names(class_names)
        if self.model.config.num_labels != len(self.class_names):
            raise CheckpointError(f"mask2former: checkpoint has {self.model.config.num_labels} classes but "
                                  f"{len(self.class_names)} class names are configured (GenEval needs COCO's 80)")
        dev = resolve_device(device)
        self.model.to(dev, resolve_dtype(dtype, dev)).eval().requires_grad_(False)
        self.shortest_edge, self.longest_edge, self.size_divisor = shortest_edge, longest_edge, size_divisor
        self.max_per_image, self.min_score, self.batch_size = max_per_image, min_score, batch_size

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[list[Detection]]:
        p = next(self.model.parameters())
        out_hw = tuple(images.shape[1:3])
        results: list[list[Detection]] = []
        for s in range(0, images.shape[0], self.batch_size):
            pixels, pmask, valid = detector_preprocess(images[s:s + self.batch_size], self.shortest_edge,
                                                       self.longest_edge, self.size_divisor, IMAGENET_MEAN,
                                                       IMAGENET_STD, p.device, p.dtype)
            out = self.model(pixel_values=pixels, pixel_mask=pmask)
            for cl, ml in zip(out.class_queries_logits, out.masks_queries_logits):
                labels, scores, boxes, masks = instance_postprocess(cl, ml, tuple(pixels.shape[-2:]), valid, out_hw,
                                                                    self.max_per_image, self.min_score)
                masks_np = masks.cpu().numpy()
                results.append([Detection(label=self.class_names[int(l)], score=float(sc),
                                          box=tuple(float(v) for v in b), mask=mk)
                                 for l, sc, b, mk in zip(labels.tolist(), scores.tolist(), boxes.cpu(), masks_np)])
        return results
