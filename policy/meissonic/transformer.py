"""Meissonic's transformer: a FLUX-style MM-DiT over VQ codes, with the released checkpoints' parameter names.

Written here (not taken from the authors' `src/transformer.py` or from diffusers) because the reference runs only
on diffusers < 0.35 (its attention processor changed), takes one timestep per call (a learner micro-batch mixes
unmasking steps, so we need one per row), builds its rotary positions through numpy on the host (a device sync
per forward) and hides the architecture behind diffusers' generic blocks. The module tree below reproduces the
release's state-dict names exactly (``transformer_blocks.N.attn.add_q_proj…``, ``mlm_layer.conv2…``), so
`MeissonFlow/Meissonic`'s ``transformer/diffusion_pytorch_model.safetensors`` loads strictly, and
`save_pretrained` writes a directory the authors' `Transformer2DModel.from_pretrained` opens.

The computation, in the reference's order (its numerics are kept, including the dtype of each step):

1. codes [B, H, W] (the mask id where masked) -> embedding (vocabulary = codebook + extra ids, mask id last) ->
   RMSNorm -> 1x1 conv: [B, C, H, W]; C = ``num_attention_heads * attention_head_dim`` (``in_channels`` is
   recorded but, as in the reference, shapes nothing).
2. With ``downsample`` (the 1024² model): RMSNorm, then a 2x2 stride-2 conv: the transformer runs on an H/2 x W/2
   grid; ``upsample`` undoes it at the end with RMSNorm and a 2x2 stride-2 transposed conv.
3. The grid flattens row-major into tokens; RMSNorm + linear.
4. Conditioning vector per row: ``cond_embed`` (linear-SiLU-linear, no biases) of [pooled text embedding, the
   256-dim sinusoids of the 5 micro-conditions] -> ``time_text_embed``: the sinusoid of ``timestep * 1000`` through
   an MLP plus an MLP of that conditioning vector. (The reference feeds `cond_embed`'s output, of the model width,
   to an MLP declared with ``pooled_projection_dim`` inputs: the two must be equal; both are 1024 in the release.)
5. Text tokens: linear from ``joint_attention_dim`` + RMSNorm.
6. ``num_layers`` dual-stream blocks (separate weights for text and image tokens, one joint attention over
   [text, image], adaLN-Zero modulation from the conditioning vector), then ``num_single_layers`` single-stream
   blocks over the concatenated [text, image] tokens (attention and MLP in parallel). Attention has RMSNorm on
   queries and keys per head and rotary positions over three axes (``axes_dims_rope``).
7. The image tokens -> RMSNorm + linear -> grid -> (upsample) -> MLM head: 1x1 conv, RMSNorm, 1x1 conv to the
   codebook: logits [B, codebook_size, H, W], channels first, in the model's dtype.

Precision (bf16 on GPUs) follows the reference: RMSNorm statistics in float32 (the result in the weight's dtype
when that is half precision), LayerNorm through torch (float32 statistics), rotary tables computed in float64
and applied in float32, attention by `scaled_dot_product_attention` in the model's dtype (the fused kernels keep
the softmax in float32), sinusoidal embeddings in float32, ``timestep`` cast to the model's dtype *before* the
multiplication by 1000 (in bf16 the product is rounded as the reference rounds it).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from policy.files import atomic_write_json
from policy.weights import CheckpointError, load_strict, read_state_dict, save_state_dict

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The class name diffusers' loader reads from config.json: the authors' `src.transformer.Transformer2DModel`.
CLASS_NAME = "Transformer2DModel"

NORM_EPS = 1e-6            # every RMSNorm / LayerNorm of the model
ROPE_THETA = 10000.0
SINUSOID_DIM = 256         # the timestep's and each micro-condition's sinusoidal embedding
NUM_MICRO_CONDS = 5        # [width, height, crop_x, crop_y, aesthetic_score]
TIMESTEP_SCALE = 1000.0    # the model multiplies the scheduler's timestep (T-1 ... 0) by this


@dataclass
class MeissonicTransformerConfig:
    """The keys of the release's ``transformer/config.json``; defaults are `MeissonFlow/Meissonic` (1024², ~1 B).

    (The reference class's own defaults are FLUX's and describe no Meissonic release.) Reading a config.json
    (`from_dict`): keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are
    diffusers' bookkeeping and ignored; any other key that is not a field here is ignored with a warning naming
    it, as diffusers' own loader ignores unknown keys, so a config written by a later release still opens while
    nothing is dropped unseen. Missing keys take the defaults.
    """

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 14
    num_single_layers: int = 28
    attention_head_dim: int = 128
    num_attention_heads: int = 8
    joint_attention_dim: int = 1024
    pooled_projection_dim: int = 1024
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    vocab_size: int = 8256
    codebook_size: int = 8192
    downsample: bool = True
    upsample: bool = True

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=true is not supported: no Meissonic release embeds a guidance scale "
                             "(the reference marks it 'unused in our implementation')")
        if self.patch_size != 1:
            raise ValueError(f"patch_size {self.patch_size}: the Meissonic architecture works on single codes "
                             f"(the reference ignores patch_size; every release has 1)")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)} must be even and sum to "
                             f"attention_head_dim {self.attention_head_dim}")
        if len(self.axes_dims_rope) != 3:
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)}: three axes (the release's ids are "
                             f"(0, row, column))")
        if self.pooled_projection_dim != self.inner_dim:
            raise ValueError(f"pooled_projection_dim {self.pooled_projection_dim} must equal num_attention_heads * "
                             f"attention_head_dim = {self.inner_dim}: the reference passes cond_embed's output "
                             f"(of the model width) to a layer sized by pooled_projection_dim")
        if self.downsample != self.upsample:
            raise ValueError("downsample and upsample must be equal: the logits must lie on the code grid")
        if self.vocab_size <= self.codebook_size:
            raise ValueError(f"vocab_size {self.vocab_size} must exceed codebook_size {self.codebook_size} "
                             f"(the mask id is an extra id: vocab_size - 1 in the release)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MeissonicTransformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
        if unknown:
            log.warning("Meissonic transformer config: ignoring unknown keys %s", unknown)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> "MeissonicTransformerConfig":
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"{str(p)!r} not found: a Meissonic transformer directory holds {CONFIG_NAME} "
                                  f"and {WEIGHTS_NAME} (the release's transformer/ folder)")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{str(p)!r} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise CheckpointError(f"{str(p)!r} holds a {type(raw).__name__}, not a config object")
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{str(p)!r} is not a Meissonic transformer config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    def release_config(self) -> dict[str, Any]:
        """config.json as the release writes it: diffusers' loader picks the class from ``_class_name`` (the
        authors' `Transformer2DModel`) and passes these keys to it."""
        return {"_class_name": CLASS_NAME, **self.to_dict()}


# ----- building blocks ---------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm with a weight, computed as the reference's (diffusers') RMSNorm: the mean square in float32; the
    normalised values stay float32 unless the weight is half precision, then they are cast to it first."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return y * self.weight


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters (eps 1e-6): the blocks' pre-modulation norm."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def sinusoid(values: torch.Tensor, dim: int = SINUSOID_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """float32 [N, dim] = [cos(v·f), sin(v·f)] for frequencies f_k = max_period^(-k/(dim/2)), k < dim/2.

    The embedding of the timestep and of each micro-condition (diffusers' `get_timestep_embedding` with
    ``flip_sin_to_cos=True, downscale_freq_shift=0``); the operations run in the same order in float32, so the
    values match the reference's bit for bit."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device)
    angles = values.float()[:, None] * torch.exp(exponent / half)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def position_ids(text_len: int, height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 [text_len + height*width, 3]: the rotary position ids of one sequence, text first.

    Text tokens are all (0, 0, 0) (rotation by zero: their attention carries no position); image token (r, c) of
    the grid the transformer runs on is (0, r, c), row-major. See `MeissonicTransformer.image_ids` for how the
    release's pipeline arrives at the same grid."""
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=torch.float32)[None, :].expand(height, width)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(height * width, 3)
    return torch.cat([torch.zeros(text_len, 3, device=device), image], dim=0)


def rotary_tables(ids: torch.Tensor, axes_dims: tuple[int, ...],
                  theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 [S, sum(axes_dims)], for position ids [S, n_axes].

    Axis i takes ``axes_dims[i]`` channels; within an axis, channel pair j rotates by ``id * theta^(-2j/d)`` and
    both channels of a pair carry the same angle (interleaved layout). Angles are computed in float64 and
    rounded to float32, as the reference does (float32 on MPS, which has no float64)."""
    wide = torch.float32 if ids.device.type == "mps" else torch.float64
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=wide, device=ids.device) / dim))
        angles = ids[:, axis].to(wide)[:, None] * freqs[None, :]
        cos.append(angles.cos().repeat_interleave(2, dim=-1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=-1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x [B, heads, S, D] by the tables [S, D], in float32."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


Rope = tuple[torch.Tensor, torch.Tensor]


class TwoLayerMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (the release's timestep, text and micro-condition embedders)."""

    def __init__(self, dim_in: int, dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """The conditioning vector of each row: MLP(sinusoid(timestep)) + MLP(pooled conditioning)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TwoLayerMLP(SINUSOID_DIM, dim)
        self.text_embedder = TwoLayerMLP(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = self.timestep_embedder(sinusoid(timestep).to(pooled.dtype))
        return t + self.text_embedder(pooled)


class AdaNormZero(nn.Module):
    """adaLN-Zero: ``linear(silu(temb))`` gives `chunks` modulation vectors; the first two shift and scale the
    LayerNorm of x, the others are returned (gates, and the MLP's shift/scale/gate in a dual block)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift, scale, *rest = self.linear(F.silu(temb)).chunk(self.chunks, dim=1)
        return (_layer_norm(x) * (1 + scale[:, None]) + shift[:, None], *rest)


class GeluProjection(nn.Module):
    """linear then GELU (tanh approximation): the first layer of a block's MLP (``ff.net.0.proj``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> 4·dim -> dim MLP; ``net`` is indexed as the release's (0: projection + GELU, 1: dropout with p=0,
    kept as an identity so that the output layer stays ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GeluProjection(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads·D] -> [B, heads, S, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotary positions on q and k, full (non-causal) attention; [B, heads, S, D] -> [B, S, heads·D]."""
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


class JointAttention(nn.Module):
    """Attention of a dual-stream block: image (to_q/k/v, to_out) and text (add_*_proj, to_add_out) tokens have
    their own projections and per-head RMSNorm on queries/keys, and attend jointly over [text, image]."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.heads
        q = torch.cat([self.norm_added_q(_heads(self.add_q_proj(ctx), h)), self.norm_q(_heads(self.to_q(x), h))], 2)
        k = torch.cat([self.norm_added_k(_heads(self.add_k_proj(ctx), h)), self.norm_k(_heads(self.to_k(x), h))], 2)
        v = torch.cat([_heads(self.add_v_proj(ctx), h), _heads(self.to_v(x), h)], 2)
        out = _attend(q, k, v, rope)
        text_len = ctx.shape[1]
        return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])


class SelfAttention(nn.Module):
    """Attention of a single-stream block (no output projection: the block's proj_out follows)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        h = self.heads
        return _attend(self.norm_q(_heads(self.to_q(x), h)), self.norm_k(_heads(self.to_k(x), h)),
                       _heads(self.to_v(x), h), rope)


def _fp16_clip(x: torch.Tensor) -> torch.Tensor:
    """The reference clips float16 residual streams to the finite range (a dtype test, no data-dependent branch)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DualStreamBlock(nn.Module):
    """MM-DiT block: text and image tokens keep separate weights and modulation, and share one attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaNormZero(dim, 6)
        self.norm1_context = AdaNormZero(dim, 6)
        self.attn = JointAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor,
                rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        nx, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        nc, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx, temb)
        attn_x, attn_c = self.attn(nx, nc, rope)
        x = x + gate[:, None] * attn_x
        x = x + gate_mlp[:, None] * self.ff(_layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        ctx = ctx + c_gate[:, None] * attn_c
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(_layer_norm(ctx) * (1 + c_scale_mlp[:, None])
                                                            + c_shift_mlp[:, None])
        return _fp16_clip(ctx), x


class SingleStreamBlock(nn.Module):
    """DiT block over [text, image] tokens: attention and a GELU MLP in parallel, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm = AdaNormZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_ratio * dim)
        self.attn = SelfAttention(dim, heads, head_dim)
        self.proj_out = nn.Linear(dim + mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: Rope) -> torch.Tensor:
        h, gate = self.norm(x, temb)
        mixed = torch.cat([self.attn(h, rope), F.gelu(self.proj_mlp(h), approximate="tanh")], dim=2)
        return _fp16_clip(x + gate[:, None] * self.proj_out(mixed))


def _channels_last_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the channels of a [B, C, H, W] map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CodeEmbedding(nn.Module):
    """codes [B, H, W] -> [B, C, H, W]: embedding, RMSNorm, 1x1 conv (no bias)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer_norm(self.embeddings(codes)).permute(0, 3, 1, 2))


class MlmHead(nn.Module):
    """[B, C, H, W] -> codebook logits [B, codebook, H, W]: 1x1 conv, RMSNorm, 1x1 conv (no biases)."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(dim)
        self.conv2 = nn.Conv2d(dim, codebook_size, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(_channels_last_norm(self.layer_norm, self.conv1(x)))


class Downsample(nn.Module):
    """RMSNorm then a 2x2 stride-2 conv. (The reference pads one zero row/column at the bottom/right first; on the
    even grids required here the kernel never reaches it, so it is left out.)"""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_channels_last_norm(self.norm, x))


class Upsample(nn.Module):
    """RMSNorm then a 2x2 stride-2 transposed conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.conv = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_channels_last_norm(self.norm, x))


class GridBlock(nn.Module):
    """``down_block`` / ``up_block``: holds the optional resampling layer under the release's names."""

    def __init__(self, dim: int, downsample: bool, upsample: bool):
        super().__init__()
        self.downsample: Optional[Downsample] = Downsample(dim) if downsample else None
        self.upsample: Optional[Upsample] = Upsample(dim) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


# ----- the model ---------------------------------------------------------------------------------------------
class MeissonicTransformer(nn.Module):
    """Codebook logits of Meissonic for a batch of code grids, one timestep per row (see the module docstring)."""

    def __init__(self, config: MeissonicTransformerConfig | None = None):
        super().__init__()
        self.config = config = config or MeissonicTransformerConfig()
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(dim, heads, head_dim)
                                                for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleStreamBlock(dim, heads, head_dim)
                                                       for _ in range(config.num_single_layers))
        self.embed = CodeEmbedding(config.vocab_size, dim)
        self.mlm_layer = MlmHead(dim, config.codebook_size)
        self.cond_embed = TwoLayerMLP(NUM_MICRO_CONDS * SINUSOID_DIM + config.pooled_projection_dim, dim, bias=False)
        self.encoder_proj_layer_norm = RMSNorm(dim)
        self.project_to_hidden_norm = RMSNorm(dim)
        self.project_to_hidden = nn.Linear(dim, dim, bias=False)
        self.project_from_hidden_norm = RMSNorm(dim)
        self.project_from_hidden = nn.Linear(dim, dim, bias=False)
        self.down_block = GridBlock(dim, downsample=config.downsample, upsample=False)
        self.up_block = GridBlock(dim, downsample=False, upsample=config.upsample)
        self.gradient_checkpointing = False
        self._rope_cache: dict[tuple, Rope] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.embeddings.weight.device

    def transformer_grid(self, height: int, width: int) -> tuple[int, int]:
        """The grid the blocks run on for a code grid of height x width (halved with ``downsample``)."""
        if self.config.downsample:
            if height % 2 or width % 2:
                raise ValueError(f"code grid {height}x{width}: the downsampling model needs even sides")
            return height // 2, width // 2
        return height, width

    def image_ids(self, height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 [h·w, 3]: the rotary ids of the image tokens for a code grid of height x width, (0, r, c) over
        the grid the transformer runs on (h, w = `transformer_grid`).

        The release's pipeline gets there by a detour: it builds ids for a grid of half the size it is given,
        and gives twice the latent size (so: the latent grid) unless the image height is exactly 1024 px, where
        it gives the latent size (so: the latent grid halved: the downsampling model's grid). The 1024² model
        run at another size, or the plain model at 1024 px, would receive ids of the wrong length and fail in the
        reference; every run that works has the ids of the transformer's own grid, which is what we build."""
        h, w = self.transformer_grid(height, width)
        return position_ids(0, h, w, device)

    def _rope(self, text_len: int, h: int, w: int, device: torch.device) -> Rope:
        key = (text_len, h, w, device)
        rope = self._rope_cache.get(key)
        if rope is None:
            rope = rotary_tables(position_ids(text_len, h, w, device), self.config.axes_dims_rope)
            self._rope_cache[key] = rope
        return rope

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, codes: torch.Tensor, micro_conds: torch.Tensor, pooled: torch.Tensor,
                encoder_hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Codebook logits [B, codebook_size, H, W] (channels first, the model's dtype).

        codes: long [B, H, W], the mask id (vocab_size - 1 in the release) at masked positions;
        micro_conds: [B, 5] = [width, height, crop_x, crop_y, aesthetic_score] (the pipeline's order);
        pooled: [B, pooled_projection_dim] (the text encoder's ``text_embeds``);
        encoder_hidden_states: [B, L, joint_attention_dim] (its penultimate hidden state);
        timestep: [B], one per row (or one value for all rows): the scheduler's timestep, T-1 ... 0.
        """
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, H, W], got {tuple(codes.shape)}")
        b, height, width = codes.shape
        if micro_conds.shape != (b, NUM_MICRO_CONDS) or pooled.shape[0] != b or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"batch {b}: micro_conds {tuple(micro_conds.shape)} (want [{b}, 5]), pooled "
                             f"{tuple(pooled.shape)}, encoder_hidden_states {tuple(encoder_hidden_states.shape)}")
        timestep = timestep.reshape(-1)
        if timestep.shape[0] not in (1, b):
            raise ValueError(f"timestep must have {b} values (one per row) or one, got {timestep.shape[0]}")
        h, w = self.transformer_grid(height, width)
        dtype = self.dtype

        micro = sinusoid(micro_conds.to(pooled.device).flatten()).reshape(b, NUM_MICRO_CONDS * SINUSOID_DIM)
        cond = self.cond_embed(torch.cat([pooled.float(), micro], dim=1).to(dtype))
        ctx = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states.to(dtype)))

        x = self.down_block(self.embed(codes))
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        x = self.project_to_hidden(self.project_to_hidden_norm(x))
        temb = self.time_text_embed(timestep.to(device=x.device, dtype=x.dtype) * TIMESTEP_SCALE, cond.to(x.dtype))
        rope = self._rope(ctx.shape[1], h, w, x.device)

        for block in self.transformer_blocks:
            ctx, x = self._run(block, x, ctx, temb, rope)
        text_len = ctx.shape[1]
        x = torch.cat([ctx, x], dim=1)
        for block in self.single_transformer_blocks:
            x = self._run(block, x, temb, rope)
        x = self.project_from_hidden(self.project_from_hidden_norm(x[:, text_len:]))
        x = self.up_block(x.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        return self.mlm_layer(x)

    # ----- checkpoints ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "MeissonicTransformer":
        """Load a transformer directory in the release's layout (``config.json`` +
        ``diffusion_pytorch_model.safetensors``, or diffusers' sharded ``*.safetensors``), strictly: a missing
        directory, config or weight file, or any missing, unexpected or mis-shaped tensor raises `CheckpointError`.
        Returned in eval mode, in `dtype` (default float32, whatever the file's dtype). The model is built on the
        meta device and its storage filled from the file (no random initialisation of ~1 B values first), so a
        subclass loaded this way must hold no non-persistent buffers."""
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise CheckpointError(f"Meissonic transformer directory {str(d)!r} does not exist: give the transformer/ "
                                  f"folder of a local copy of MeissonFlow/Meissonic (or of a checkpoint of ours)")
        config = MeissonicTransformerConfig.from_file(d / CONFIG_NAME)
        weights = d / WEIGHTS_NAME
        state_dict = read_state_dict(weights if weights.is_file() else d)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device="cpu")        # no random initialisation of weights that are overwritten
        load_strict(model, state_dict, f"Meissonic transformer {str(d)!r}")
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> list[Path]:
        """Write ``config.json`` (`MeissonicTransformerConfig.release_config`) and
        ``diffusion_pytorch_model.safetensors`` (the released names), atomically; returns the files written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_state_dict(self.state_dict(), d / WEIGHTS_NAME)
        atomic_write_json(d / CONFIG_NAME, self.config.release_config())
        return [d / WEIGHTS_NAME, d / CONFIG_NAME]
