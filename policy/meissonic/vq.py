"""Meissonic's image decoder: codes -> pixels through diffusers' `VQModel` (the release's ``vqvae/``).

diffusers maintains this tokenizer (the aMUSEd / Meissonic VQ-GAN with ``lookup_from_codebook``), so it is used
as is; only loading (offline, strict) and the release's decoding conventions are ours:

* the pipeline decodes with ``vq.decode(codes, force_not_quantize=True, shape=(B, h, w, latent_channels))``: each
  code is looked up in the codebook (no re-quantisation), the [B, h, w, C] latents are made channels first;
* the image is ``sample.clip(0, 1)``: the decoder's output range is [0, 1] (not [-1, 1] as Show-o's MAGVIT);
* to 8 bits as the pipeline's default PIL output (`VaeImageProcessor.numpy_to_pil`): ``round(x * 255)``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from policy.weights import CheckpointError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], as the release's pipeline makes its PIL images:
    clip to [0, 1], ``x * 255`` in float32, rounded to nearest (half to even)."""
    x = images.float().clamp(0.0, 1.0) * 255.0
    return x.round().permute(0, 2, 3, 1).to(torch.uint8).contiguous()


class MeissonicVQDecoder(nn.Module):
    """Codes of a Meissonic image grid -> images, by the release's `VQModel`."""

    def __init__(self, vq: nn.Module):
        super().__init__()
        self.vq = vq

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "MeissonicVQDecoder":
        """Load a local ``vqvae/`` directory (config.json + diffusion_pytorch_model.safetensors), offline,
        refusing any missing, unexpected or mis-shaped tensor; eval mode, gradients off."""
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise CheckpointError(f"VQ decoder directory {str(d)!r} does not exist: give the vqvae/ folder of a "
                                  f"local copy of MeissonFlow/Meissonic")
        if not (d / "config.json").is_file():
            raise CheckpointError(f"VQ decoder directory {str(d)!r} has no config.json")
        from diffusers import VQModel
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        try:
            vq, info = VQModel.from_pretrained(str(d), local_files_only=True, output_loading_info=True,
                                               low_cpu_mem_usage=False, **kwargs)
        except Exception as e:
            raise CheckpointError(f"cannot load the VQ decoder in {str(d)!r} ({type(e).__name__}: {e})") from e
        problems = [f"{k.replace('_', ' ')}: {list(v)[:5]}" for k, v in info.items() if v]
        if problems:
            raise CheckpointError(f"VQ decoder {str(d)!r} does not match its config: {'; '.join(problems)}")
        if not vq.config.lookup_from_codebook:
            raise CheckpointError(f"VQ decoder {str(d)!r}: lookup_from_codebook is false; Meissonic decodes codes by "
                                  f"codebook lookup (the release's vqvae/ has it true)")
        vq.requires_grad_(False)
        return cls(vq.eval())

    @property
    def codebook_size(self) -> int:
        return int(self.vq.config.num_vq_embeddings)

    @property
    def scale_factor(self) -> int:
        """Pixels per code along each side (the pipeline's ``vae_scale_factor``)."""
        return 2 ** (len(self.vq.config.block_out_channels) - 1)

    def decode(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """float32 [B, 3, H, W] in [0, 1] for codes long [B, N] (N = h·w, row-major) or [B, h, w].

        `grid` = (h, w); default: the codes' own grid, or a square one for [B, N]."""
        b = codes.shape[0]
        if grid is None:
            if codes.ndim == 3:
                grid = (codes.shape[1], codes.shape[2])
            else:
                side = math.isqrt(codes.shape[1])
                if side * side != codes.shape[1]:
                    raise ValueError(f"{codes.shape[1]} codes per image are not a square grid: give grid=(h, w)")
                grid = (side, side)
        h, w = grid
        if codes[0].numel() != h * w:
            raise ValueError(f"codes {tuple(codes.shape)} do not fill a {h}x{w} grid")
        shape = (b, h, w, int(self.vq.config.latent_channels))
        sample = self.vq.decode(codes.reshape(b, h * w), force_not_quantize=True, shape=shape).sample
        return sample.clip(0, 1).float()

    def decode_uint8(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 [B, H, W, 3] (see `to_uint8`)."""
        return to_uint8(self.decode(codes, grid))
