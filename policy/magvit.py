"""MAGVIT-v2 image tokenizer of Show-o (the ``showlab/magvitv2`` release), for encoding and decoding only.

A VQGAN-style convolutional encoder/decoder with a lookup-free quantizer (LFQ): the encoder maps an image in
[-1, 1] to ``z_channels`` feature maps at 1/2**(levels-1) resolution; each spatial position becomes the integer
whose bits (most significant bit = channel 0) say which channels are > 0. Decoding turns every code back into its
±1 bit vector and runs the decoder.

The module tree reproduces the release's state-dict key names exactly (``encoder.*``, ``decoder.*``,
``quantize.embedding`` / ``quantize.power_vals`` buffers), so the released ``pytorch_model.safetensors`` loads
strictly. Behaviours of the reference that are kept on purpose:

* encoder and decoder are asymmetric in the release (encoder ``ch_mult`` [1,2,2,4,4] / blocks [4,3,4,3,4],
  decoder ``ch_mult`` [1,1,2,2,4] / blocks [4,4,3,4,3]);
* where attention is placed is decided from the *configured* ``resolution`` (256), not from the actual input size,
  and the released ``attn_resolutions=[5]`` never matches, so only the two mid-block attentions exist;
* an attention layer, where present, follows *every* residual block of its level;
* downsampling pads right/bottom by one then uses a stride-2 3x3 convolution; upsampling is nearest x2 then a 3x3
  convolution; GroupNorm has 32 groups and eps 1e-6; the non-linearity is swish;
* the encoder ends with ``quant_conv`` and the decoder starts with ``post_quant_conv`` (both 1x1, inside them);
* a channel is quantized to +1 iff its value is strictly > 0 (0 maps to bit 0);
* the release's ``config.json`` holds no architecture fields (the reference model takes no arguments), so the
  defaults of :class:`MagvitConfig` are the released architecture.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from policy.files import atomic_write_json
from policy.weights import CheckpointError, load_strict, read_state_dict, save_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CLASS_NAME = "MAGViTv2"

# Keys of a nested encoder/decoder dict (the reference's per-module kwargs) that both sides share, mapped to
# config fields; ``ch_mult`` and ``num_res_blocks`` are per side.
_SHARED_KEYS = {"ch": "ch", "attn_resolutions": "attn_resolutions", "resolution": "resolution",
                "z_channels": "z_channels", "in_ch": "in_channels", "out_ch": "out_channels"}


@dataclass
class MagvitConfig:
    """Architecture of a MAGVIT-v2 tokenizer; the defaults are the ``showlab/magvitv2`` release."""

    ch: int = 128
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 4])
    encoder_num_res_blocks: list[int] = field(default_factory=lambda: [4, 3, 4, 3, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_num_res_blocks: list[int] = field(default_factory=lambda: [4, 4, 3, 4, 3])
    attn_resolutions: list[int] = field(default_factory=lambda: [5])
    resolution: int = 256
    z_channels: int = 13          # = LFQ bits; codebook size 2**z_channels
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        self.encoder_ch_mult = [int(m) for m in self.encoder_ch_mult]
        self.decoder_ch_mult = [int(m) for m in self.decoder_ch_mult]
        self.encoder_num_res_blocks = _per_level(self.encoder_num_res_blocks, len(self.encoder_ch_mult),
                                                 "encoder_num_res_blocks")
        self.decoder_num_res_blocks = _per_level(self.decoder_num_res_blocks, len(self.decoder_ch_mult),
                                                 "decoder_num_res_blocks")
        self.attn_resolutions = [int(r) for r in self.attn_resolutions]
        if min(self.encoder_num_res_blocks + self.decoder_num_res_blocks, default=1) < 1:
            raise ValueError("MagvitConfig: every level needs at least one residual block")
        if not self.encoder_ch_mult or not self.decoder_ch_mult:
            raise ValueError("MagvitConfig: ch_mult must have at least one level")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(f"MagvitConfig: encoder has {len(self.encoder_ch_mult)} levels but decoder has "
                             f"{len(self.decoder_ch_mult)}; both must change the resolution by the same factor")
        widths = [self.ch] + [self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult]
        bad = sorted({w for w in widths if w <= 0 or w % 32})
        if bad:
            raise ValueError(f"MagvitConfig: channel widths {bad} are not positive multiples of 32 "
                             f"(GroupNorm uses 32 groups)")
        if not 1 <= self.z_channels <= 62:
            raise ValueError(f"MagvitConfig: z_channels={self.z_channels} must be in [1, 62]")

    @property
    def codebook_size(self) -> int:
        return 2 ** self.z_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def from_release_config(cls, d: Mapping[str, Any]) -> "MagvitConfig":
        """A config from a dict: this dataclass's own keys, or nested reference-style ``encoder``/``decoder``
        dicts (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``resolution``, ``z_channels``,
        ``in_ch``, ``out_ch``); every other key (``_class_name``, ``_diffusers_version``, ...) is ignored."""
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        for side in ("encoder", "decoder"):
            sub = d.get(side)
            if isinstance(sub, Mapping):
                _merge_side(kw, sub, side)
        if d.get("double_z"):
            raise ValueError("MagvitConfig: double_z=True is not supported (MAGVIT-v2 uses a single z)")
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "MagvitConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_release_config(json.load(f))

    @classmethod
    def from_encoder_decoder(cls, encoder: Mapping[str, Any], decoder: Mapping[str, Any]) -> "MagvitConfig":
        """A config from the reference's separate ``VQGANEncoder`` / ``VQGANDecoder`` keyword dicts."""
        return cls.from_release_config({"encoder": encoder, "decoder": decoder})

    @classmethod
    def from_tiny_fixture(cls, tiny_config: Mapping[str, Any]) -> "MagvitConfig":
        """The MAGVIT-v2 config of a parity fixture's ``tiny_config.json`` (its ``magvit_encoder`` /
        ``magvit_decoder`` dicts)."""
        try:
            enc, dec = tiny_config["magvit_encoder"], tiny_config["magvit_decoder"]
        except KeyError as e:
            raise ValueError(f"tiny config has no {e.args[0]!r} entry") from e
        return cls.from_encoder_decoder(enc, dec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _per_level(v: int | Sequence[int], levels: int, name: str) -> list[int]:
    out = [int(v)] * levels if isinstance(v, int) else [int(x) for x in v]
    if len(out) != levels:
        raise ValueError(f"MagvitConfig: {name} has {len(out)} entries for {levels} levels")
    return out


def _merge_side(kw: dict[str, Any], sub: Mapping[str, Any], side: str) -> None:
    if "ch_mult" in sub:
        kw[f"{side}_ch_mult"] = list(sub["ch_mult"])
    if "num_res_blocks" in sub:
        kw[f"{side}_num_res_blocks"] = sub["num_res_blocks"]
    if sub.get("double_z"):
        raise ValueError("MagvitConfig: double_z=True is not supported (MAGVIT-v2 uses a single z)")
    for key, name in _SHARED_KEYS.items():
        if key not in sub:
            continue
        val = list(sub[key]) if isinstance(sub[key], (list, tuple)) else sub[key]
        if name in kw and kw[name] != val:
            raise ValueError(f"MagvitConfig: {side}.{key}={val!r} conflicts with {kw[name]!r}; encoder and "
                             f"decoder must share {key}")
        kw[name] = val


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (names of attributes = the release's state-dict names)

def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3 twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions (1x1 conv projections), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # [B, 1, HW, C]: one head of width C; SDPA's default scale is C**-0.5 as in the reference
        q, k, v = (p(h).reshape(b, 1, c, hgt * wid).transpose(-1, -2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, each followed by its attention where the level has any."""

    def __init__(self, widths: Sequence[tuple[int, int]], with_attn: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o) for _, o in widths) if with_attn else nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class MagvitEncoder(nn.Module):
    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        mult, nblocks = cfg.encoder_ch_mult, cfg.encoder_num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res = cfg.resolution
        block_in = cfg.ch
        self.down = nn.ModuleList()
        for lvl, m in enumerate(mult):
            block_out = cfg.ch * m
            widths = [(block_in if i == 0 else block_out, block_out) for i in range(nblocks[lvl])]
            level = _Level(widths, with_attn=res in cfg.attn_resolutions)
            block_in = block_out
            if lvl != len(mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.quant_conv(h)


class MagvitDecoder(nn.Module):
    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        mult, nblocks = cfg.decoder_ch_mult, cfg.decoder_num_res_blocks
        block_in = cfg.ch * mult[-1]
        res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = [None] * len(mult)  # type: ignore[list-item]
        for lvl in reversed(range(len(mult))):       # built from the lowest resolution up; up[0] is full size
            block_out = cfg.ch * mult[lvl]
            widths = [(block_in if i == 0 else block_out, block_out) for i in range(nblocks[lvl])]
            level = _Level(widths, with_attn=res in cfg.attn_resolutions)
            block_in = block_out
            if lvl != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels[lvl] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)  # applied first, registered last

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LookupFreeQuantizer(nn.Module):
    """Sign quantization of ``bits`` channels; code = Σ_i [z_i > 0]·2^(bits-1-i).

    The buffers (``embedding``: the ±1 vector of every code, ``power_vals``: 2^(bits-1..0)) are part of the
    release's state dict; they are constants, rebuilt by :meth:`reset_buffers`.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("embedding", torch.empty(2 ** bits, bits))
        self.register_buffer("power_vals", torch.empty(bits, dtype=torch.long))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        if self.embedding.is_meta:
            return
        emb, powers = self.expected_buffers(self.bits, self.embedding.device)
        self.embedding.copy_(emb)
        self.power_vals.copy_(powers)

    @staticmethod
    def expected_buffers(bits: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        shifts = torch.arange(bits - 1, -1, -1, dtype=torch.long, device=device)
        codes = torch.arange(2 ** bits, dtype=torch.long, device=device)
        emb = ((codes[:, None] >> shifts) & 1).float() * 2 - 1
        return emb, 2 ** shifts

    def codes_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """[B, bits, h, w] continuous latent -> long [B, h*w] codes in raster order."""
        bits = (z > 0).long()
        codes = (bits * self.power_vals.view(1, -1, 1, 1)).sum(1)
        return codes.flatten(1)

    def latent_from_codes(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """long [B, h*w] codes -> [B, bits, h, w] ±1 latent."""
        z = self.embedding[codes]                       # [B, h*w, bits]
        return z.view(codes.shape[0], h, w, self.bits).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------

class MagvitV2(nn.Module):
    """MAGVIT-v2 tokenizer: ``encode`` images in [-1, 1] to codes, ``decode`` codes to images."""

    def __init__(self, config: MagvitConfig | None = None):
        super().__init__()
        self.config = config if config is not None else MagvitConfig()
        self.encoder = MagvitEncoder(self.config)
        self.decoder = MagvitDecoder(self.config)
        self.quantize = LookupFreeQuantizer(self.config.z_channels)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _param_dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    def _device(self) -> torch.device:
        return self.decoder.conv_out.weight.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [-1, 1] -> long [B, (H/f)*(W/f)] codes (raster order), f = downsample factor."""
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects images [B, {self.config.in_channels}, H, W], got "
                             f"{tuple(images.shape)}")
        f = self.config.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"encode: image size {tuple(images.shape[-2:])} is not a multiple of {f}")
        z = self.encoder(images.to(device=self._device(), dtype=self._param_dtype()))
        return self.quantize.codes_from_latent(z)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """long [B, N] codes -> float [B, 3, h*f, w*f], about [-1, 1] (not clamped).

        The token grid is ``shape`` = (h, w) when given, else square with side sqrt(N).
        """
        if codes.dim() != 2:
            raise ValueError(f"decode expects codes [B, N], got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"decode expects integer codes, got {codes.dtype}")
        n = codes.shape[1]
        if shape is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"decode: {n} codes per image is not a square grid; pass shape=(h, w)")
            shape = (side, side)
        h, w = int(shape[0]), int(shape[1])
        if h * w != n:
            raise ValueError(f"decode: shape {(h, w)} does not hold {n} codes")
        if codes.numel():   # checked where the codes are (CPU codes from a trajectory: no device read-back)
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"decode: codes must be in [0, {self.codebook_size - 1}], got range [{lo}, {hi}] "
                                 f"(remove the text-vocabulary offset and clamp as the reference does)")
        codes = codes.to(device=self._device(), dtype=torch.long)
        z = self.quantize.latent_from_codes(codes, h, w).to(self._param_dtype())
        return self.decoder(z)

    @torch.no_grad()
    def decode_uint8(self, codes: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """long [B, N] codes -> uint8 [B, H, W, 3] as the reference saves images:
        ``clamp((x + 1) / 2, 0, 1) * 255`` in float32, truncated toward zero (numpy ``astype(uint8)``)."""
        return to_uint8(self.decode(codes, shape))

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "MagvitV2":
        """Load a local release directory (``config.json`` + ``*.safetensors`` / ``pytorch_model.bin``), strictly.

        Raises :class:`CheckpointError` naming the problem for a missing directory or config, an unreadable
        config or weight file, or tensors that do not match the configured architecture. The model is returned
        in eval mode with gradients disabled.
        """
        p = Path(path).expanduser()
        if not p.exists():
            raise CheckpointError(f"MAGVIT-v2 checkpoint directory {str(p)!r} does not exist: set the config's "
                                  f"path to a local copy of showlab/magvitv2 (no weights are downloaded at run time)")
        if not p.is_dir():
            raise CheckpointError(f"MAGVIT-v2 checkpoint {str(p)!r} is a file; expected the release directory "
                                  f"holding {CONFIG_NAME} and the weights")
        cfg_path = p / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"MAGVIT-v2 checkpoint directory {str(p)!r} has no {CONFIG_NAME}")
        try:
            config = MagvitConfig.from_json_file(cfg_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot parse {str(cfg_path)!r} ({type(e).__name__}: {e}): the file is "
                                  f"corrupted, download it again") from e
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"invalid MAGVIT-v2 config {str(cfg_path)!r}: {e}") from e
        state = read_state_dict(p)

        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        model.quantize.reset_buffers()
        state = dict(state)
        # the LFQ buffers are constants: accept a file that lacks them, refuse one that disagrees with them
        for name in ("embedding", "power_vals"):
            state.setdefault(f"quantize.{name}", getattr(model.quantize, name).clone())
        load_strict(model, state, f"MAGVIT-v2 {str(p)!r}")
        emb, powers = LookupFreeQuantizer.expected_buffers(config.z_channels)
        if not (torch.equal(model.quantize.embedding, emb) and torch.equal(model.quantize.power_vals, powers)):
            raise CheckpointError(f"MAGVIT-v2 {str(p)!r}: quantize.embedding / quantize.power_vals differ from the "
                                  f"lookup-free quantizer's constants; the checkpoint is corrupted")
        model.to(device=device, dtype=dtype)
        model.eval().requires_grad_(False)
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (all parameters and buffers) into directory ``path``."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        save_state_dict(self.state_dict(), p / WEIGHTS_NAME)
        cfg = {"_class_name": _CLASS_NAME, **self.config.to_dict()}
        atomic_write_json(p / CONFIG_NAME, cfg, indent=2)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] about [-1, 1] -> uint8 [B, H, W, 3], exactly as the reference's image saving."""
    x = torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0) * 255.0
    return x.permute(0, 2, 3, 1).to(torch.uint8).contiguous()
