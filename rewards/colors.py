"""GenEval's colour classifier: zero-shot CLIP ViT-L-14 (OpenAI) over ten colours on masked, cropped objects."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from rewards.detectors import register_color_classifier
from rewards.openclip import encode_image, encode_text, load_open_clip, model_device_dtype, open_clip_image_cfg
from rewards.preprocess import clip_preprocess_float
from rewards.types import GENEVAL_COLORS, Detection

TEMPLATES = ("a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object")


def crop_box(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """Integer crop (x0, y0, x1, y1) as PIL's ``Image.crop`` rounds a float box, clipped to the image, >= 1 px."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box[:4])
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    return x0, y0, x1, y1


def masked_crop(image: torch.Tensor, det: Detection, background: Sequence[int] = (153, 153, 153),
                crop: bool = True) -> torch.Tensor:
    """uint8 [H,W,3] image -> float [3,h,w] in [0,1]: the object's mask pasted on `background`, cropped to its box."""
    h, w = image.shape[:2]
    x = image
    if det.mask is not None:
        mask = torch.as_tensor(det.mask, dtype=torch.bool, device=image.device)
        if tuple(mask.shape) != (h, w):
            raise ValueError(f"detection mask {tuple(mask.shape)} does not match the image {(h, w)}")
        bg = torch.tensor(background, dtype=image.dtype, device=image.device)
        x = torch.where(mask[..., None], image, bg)
    if crop:
        x0, y0, x1, y1 = crop_box(det.box, h, w)
        x = x[y0:y1, x0:x1]
    return x.permute(2, 0, 1).float() / 255.0


@register_color_classifier("clip")
class ClipColorClassifier:
    """Argmax over `colors` of 100 x cos(image, mean of the normalised template embeddings), as GenEval does.

    ``path``: an open_clip ViT-L-14 checkpoint of OpenAI's weights (``quick_gelu=True``, as for ``pretrained=
    "openai"``). The object is pasted on grey #999 through its mask (when it has one) and cropped to its box.
    """

    def __init__(self, path: str, arch: str = "ViT-L-14", quick_gelu: bool = True,
                 model_config: str | dict | None = None, colors: Sequence[str] = GENEVAL_COLORS,
                 background: Sequence[int] = (153, 153, 153), crop: bool = True, device: Optional[str] = None,
                 dtype: Optional[str] = None, batch_size: int = 64):
        self.model, self.tokenizer = load_open_clip(arch, path, "colour classifier (CLIP)", quick_gelu=quick_gelu,
                                                    expected=f"an open_clip {arch} checkpoint of OpenAI's weights",
                                                    model_config=model_config, device=device, dtype=dtype)
        self.size, self.mean, self.std = open_clip_image_cfg(self.model)
        self.colors, self.background, self.crop = tuple(colors), tuple(background), crop
        self.batch_size = batch_size
        self._classifiers: dict[str, torch.Tensor] = {}

    def text_classifier(self, classname: str) -> torch.Tensor:
        """[D, n_colors]: per colour the normalised mean of the normalised template embeddings (cached)."""
        if classname not in self._classifiers:
            texts = [t.format(c=c, object=classname) for c in self.colors for t in TEMPLATES]
            emb = encode_text(self.model, self.tokenizer, texts).view(len(self.colors), len(TEMPLATES), -1).mean(1)
            self._classifiers[classname] = torch.nn.functional.normalize(emb, dim=-1).T
        return self._classifiers[classname]

    @torch.no_grad()
    def classify(self, images: torch.Tensor, queries: Sequence[tuple[int, Detection, str]]) -> list[str]:
        if not queries:
            return []
        device, _ = model_device_dtype(self.model)
        pixels = torch.cat([clip_preprocess_float(masked_crop(images[i].to(device), det, self.background,
                                                              self.crop)[None], self.size, self.mean, self.std)
                            for i, det, _ in queries])
        feats = torch.cat([encode_image(self.model, pixels[s:s + self.batch_size])
                           for s in range(0, len(pixels), self.batch_size)])
        out = []
        for f, (_, _, cls) in zip(feats, queries):
            out.append(self.colors[int((100.0 * f @ self.text_classifier(cls)).argmax())])
        return out
