"""The Show-o transformer: Phi-1.5 with the extended vocabulary, per-head QK LayerNorm and omni-attention.

The module tree reproduces the released checkpoints' key layout (``showo.model.layers.N.self_attn.q_proj…``,
``showo.lm_head``), so `showlab/show-o`, `showlab/show-o-512x512` and the Mask-GRPO `mycheckpoint.pth` load
strictly and our checkpoints load back in the reference code.

The Phi blocks are written here rather than taken from `transformers.PhiForCausalLM` because Show-o needs three
things that model does not offer stably across transformers releases: QK LayerNorm applied per head (always on),
an arbitrary omni-attention mask, and reuse of the text prefix's keys/values while the image block changes
(text tokens never attend to image tokens). The phi-1.5 architecture values come from its ``config.json``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from .family import Condition, MaskedModel, repeat_each
from .files import atomic_write_json
from .layout import TokenLayout, omni_attention_mask
from .weights import CheckpointError, load_strict, read_state_dict, save_state_dict

# File names of a checkpoint directory. showlab/Show-o's `Showo.from_pretrained` (its own diffusers-style
# ModelMixin, models/modeling_utils.py) opens `pytorch_model.safetensors`, else `pytorch_model.bin`; we write the
# former and still read `model.safetensors`, the name this project wrote before.
WEIGHTS_NAME = "pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LLM_CONFIG_DIR = "llm"           # a Phi config.json for architectures other than phi-1.5 (see release_config)
PHI_1_5 = "microsoft/phi-1_5"    # Show-o's `llm_model_path`: its Showo builds the Phi from AutoConfig of this


@dataclass
class PhiArch:
    """The architecture values of a Phi config.json (defaults: microsoft/phi-1_5)."""
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048

    @staticmethod
    def from_hf_config(d: dict[str, Any]) -> "PhiArch":
        known = {f.name for f in fields(PhiArch)}
        values = {k: v for k, v in d.items() if k in known}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" not in values and "partial_rotary_factor" in rope:
            values["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if d.get("num_key_value_heads") not in (None, d.get("num_attention_heads", PhiArch.num_attention_heads)):
            raise ValueError("grouped-query attention (num_key_value_heads != num_attention_heads) is not Show-o's Phi")
        return PhiArch(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_config(self, vocab_size: int, bos_id: int, eos_id: int) -> dict[str, Any]:
        """This architecture as a transformers Phi ``config.json`` (what ``AutoConfig.from_pretrained`` reads).
        QK LayerNorm is on: Show-o's Phi always applies it, transformers' only when the config says so."""
        return {"model_type": "phi", "architectures": ["PhiForCausalLM"], "vocab_size": vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_attention_heads, "partial_rotary_factor": self.partial_rotary_factor,
                "rope_theta": self.rope_theta, "layer_norm_eps": self.layer_norm_eps, "hidden_act": self.hidden_act,
                "max_position_embeddings": self.max_position_embeddings, "qk_layernorm": True,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": False,
                "bos_token_id": bos_id, "eos_token_id": eos_id}

    @staticmethod
    def sizes_from_tensors(shapes: dict[str, Any], base: "PhiArch | None" = None) -> "PhiArch":
        """`base` (default phi-1.5) with hidden size, layers, heads and MLP width read from a Show-o state dict's
        tensor shapes (``showo.model.embed_tokens.weight``, ``…layers.N…``, ``…q_layernorm.weight`` = head_dim,
        ``…mlp.fc1.weight``). Values the tensors do not fix (rotary fraction and base, eps, activation, maximum
        position) stay those of `base`."""
        base = base or PhiArch()
        shape = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
        values = asdict(base)
        prefix = "showo.model."
        emb = shape.get(prefix + "embed_tokens.weight")
        layers = {int(k[len(prefix + "layers."):].split(".", 1)[0]) for k in shape if k.startswith(prefix + "layers.")}
        if emb is None or not layers:
            return base
        values["hidden_size"] = emb[1]
        values["num_hidden_layers"] = max(layers) + 1
        fc1 = shape.get(prefix + "layers.0.mlp.fc1.weight")
        if fc1 is not None:
            values["intermediate_size"] = fc1[0]
        head_dim = shape.get(prefix + "layers.0.self_attn.q_layernorm.weight")
        if head_dim is not None and head_dim[0] > 0 and emb[1] % head_dim[0] == 0:
            values["num_attention_heads"] = emb[1] // head_dim[0]
        return PhiArch(**values)


@dataclass
class ShowoConfig:
    """Show-o's config.json values that shape the model, plus the phi architecture."""
    vocab_size: int = 58498
    llm_vocab_size: int = 50295
    codebook_size: int = 8192
    num_vq_tokens: int = 256
    num_new_special_tokens: int = 10
    max_seq_length: int = 128
    bos_id: int = 50256
    eos_id: int = 50256
    phi: PhiArch = field(default_factory=PhiArch)

    def __post_init__(self) -> None:
        if isinstance(self.phi, dict):
            self.phi = PhiArch.from_hf_config(self.phi)
        expected = self.llm_vocab_size + self.num_new_special_tokens + self.codebook_size + 1
        if self.vocab_size != expected:
            raise ValueError(f"vocab_size {self.vocab_size} != llm_vocab_size + special + codebook + mask = {expected}")
        if self.phi.hidden_size % self.phi.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        side = math.isqrt(self.num_vq_tokens)
        if side * side != self.num_vq_tokens:
            raise ValueError(f"num_vq_tokens {self.num_vq_tokens} is not a square grid")

    def activation_bytes_per_row(self, checkpointing: bool) -> float:
        """An estimate of one trained row's activation memory in bf16 (`learner.memory`). Without checkpointing,
        per layer and token ~(16·hidden + 3·intermediate) saved values (layer-norm inputs, q/k/v before and after
        their norms and the rotary, attention in/out, MLP in/out); with it, each layer's input plus one layer's
        activations while it is recomputed. Both add the [N, C] logits, fp32 log-probs and their gradient.
        (Show-o-512: about 2.7 GiB without, 0.28 GiB with checkpointing.)"""
        h, i, layers = self.phi.hidden_size, self.phi.intermediate_size, self.phi.num_hidden_layers
        tokens = self.num_vq_tokens + 2
        one_layer = tokens * (16 * h + 3 * i) * 2.0
        saved = layers * tokens * h * 2.0 + one_layer if checkpointing else layers * one_layer
        return saved + self.num_vq_tokens * self.codebook_size * (2 + 4 + 4)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.llm_vocab_size, self.codebook_size, self.num_vq_tokens, self.max_seq_length,
                           self.bos_id, self.eos_id, self.num_new_special_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def release_config(self, llm_model_path: str | None = None) -> dict[str, Any]:
        """config.json in the layout of showlab/Show-o's checkpoints, plus this project's keys.

        Show-o's `Showo(w_clip_vit, vocab_size, llm_vocab_size, llm_model_path='', codebook_size=8192,
        num_vq_tokens=256, load_from_showo=True, **kwargs)` is built from these keys by its `from_pretrained`
        (diffusers' config handling: `_class_name` names the class, unknown keys are ignored); with
        `load_from_showo` it builds the Phi from `AutoConfig.from_pretrained(llm_model_path)` and resizes the
        vocabulary to `vocab_size`. `llm_model_path` defaults to "microsoft/phi-1_5" for phi-1.5's architecture
        (every Show-o release); other architectures need the path of a Phi config (see `write_pretrained`).
        Our keys: `num_new_special_tokens`, `max_seq_length`, `bos_id`, `eos_id` and `phi` (the architecture).
        """
        if llm_model_path is None:
            if self.phi != PhiArch():
                raise ValueError("this Phi architecture is not phi-1.5's: give llm_model_path (a Phi config dir)")
            llm_model_path = PHI_1_5
        return {"_class_name": "Showo", "w_clip_vit": False, "vocab_size": self.vocab_size,
                "llm_vocab_size": self.llm_vocab_size, "llm_model_path": str(llm_model_path),
                "codebook_size": self.codebook_size, "num_vq_tokens": self.num_vq_tokens,
                "num_new_special_tokens": self.num_new_special_tokens, "load_from_showo": True,
                "mask_token_id": self.vocab_size - 1, "max_seq_length": self.max_seq_length,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "phi": asdict(self.phi)}

    @staticmethod
    def from_release(release_dir: str | Path, phi_config: str | Path | dict | None = None,
                     max_seq_length: int | None = None, bos_id: int | None = None, eos_id: int | None = None,
                     tensor_shapes: dict[str, Any] | None = None) -> "ShowoConfig":
        """Read the config.json of a Show-o checkpoint directory: a release (showlab/show-o, show-o-512x512), a
        directory saved by Show-o's own code, or one saved here.

        Show-o's keys: vocab_size, llm_vocab_size, codebook_size, num_vq_tokens, llm_model_path (and
        num_new_special_tokens when its training config passed it). The Phi architecture comes from `phi_config`
        (a Phi config.json path or dict), else from our ``phi`` entry, else from the Phi config that
        ``llm_model_path`` names when it is a local path, else phi-1.5's values; in the last two cases the sizes
        (hidden, layers, heads, MLP width) are read from `tensor_shapes` when given, so a directory saved by
        Show-o's code for any Phi size loads without extra arguments. Missing values: num_new_special_tokens =
        vocab_size - llm_vocab_size - codebook_size - 1; bos/eos = phi-1.5's <|endoftext|> (50256) if the text
        vocabulary has it, else its last id; max_seq_length (the prompt length: a value of Show-o's training yaml,
        in neither its config.json nor any tensor) = 128 as in every Show-o release; pass it when the
        checkpoint was trained with another.
        """
        d = Path(release_dir)
        path = d / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} not found: a Show-o release directory holds config.json "
                                  f"and pytorch_model.safetensors / pytorch_model.bin / *.safetensors")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from e
        missing = [k for k in ("vocab_size", "llm_vocab_size") if k not in raw]
        if missing:
            raise CheckpointError(f"{str(path)!r} lacks {missing}: not the config.json of a Show-o checkpoint")
        llm = _local_llm_config(raw.get("llm_model_path"), d)
        if isinstance(phi_config, (str, Path)):
            phi_config = json.loads(Path(phi_config).read_text())
        if phi_config:
            phi = PhiArch.from_hf_config(phi_config)
        elif raw.get("phi"):
            phi = PhiArch.from_hf_config(raw["phi"])
        else:
            phi = PhiArch.from_hf_config(llm) if llm else PhiArch()
            if tensor_shapes:
                phi = PhiArch.sizes_from_tensors(tensor_shapes, phi)
        values = {k: raw[k] for k in ("vocab_size", "llm_vocab_size", "codebook_size", "num_vq_tokens",
                                      "num_new_special_tokens", "max_seq_length", "bos_id", "eos_id") if k in raw}
        values.setdefault("codebook_size", ShowoConfig.codebook_size)
        values.setdefault("num_new_special_tokens",
                          values["vocab_size"] - values["llm_vocab_size"] - values["codebook_size"] - 1)
        text_vocab = values["llm_vocab_size"]
        for key, given in (("bos_id", bos_id), ("eos_id", eos_id)):
            if given is not None:
                values[key] = given
            elif key not in values:     # (a Phi config's bos/eos_token_id are not the tokenizer's: not used)
                values[key] = 50256 if text_vocab > 50256 else text_vocab - 1
        if max_seq_length is not None:
            values["max_seq_length"] = max_seq_length
        return ShowoConfig(phi=phi, **values)


def _local_llm_config(llm_model_path: Any, base: Path) -> dict[str, Any] | None:
    """The Phi config.json that a config's `llm_model_path` names, when it is a local directory or file (absolute,
    relative to the working directory, or relative to the checkpoint directory); None for a hub id."""
    if not llm_model_path or not isinstance(llm_model_path, str):
        return None
    for candidate in (Path(llm_model_path).expanduser(), base / llm_model_path):
        f = candidate / CONFIG_NAME if candidate.is_dir() else candidate
        if f.is_file() and f.suffix == ".json":
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{str(f)!r} (llm_model_path) is not valid JSON: {e}") from e
    return None


def write_pretrained(directory: str | Path, state_dict: dict[str, torch.Tensor], config: ShowoConfig,
                     final_directory: str | Path | None = None) -> list[Path]:
    """Write a Show-o checkpoint directory that both loaders open: ``pytorch_model.safetensors`` (the released
    key layout) and ``config.json`` (`ShowoConfig.release_config`); for a Phi other than phi-1.5 also
    ``llm/config.json``, which ``llm_model_path`` names by absolute path (of `final_directory`, where the
    directory will live once renamed; default `directory`): Show-o's code resolves it from its own working
    directory, so move the checkpoint and it needs that key edited, while our loader reads ``phi`` instead.
    A stale ``model.safetensors`` of an earlier save is removed. Returns the files written."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    llm_path = None
    if config.phi != PhiArch():
        llm_dir = d / LLM_CONFIG_DIR
        llm_dir.mkdir(exist_ok=True)
        written.append(atomic_write_json(llm_dir / CONFIG_NAME,
                                         config.phi.hf_config(config.vocab_size, config.bos_id, config.eos_id)))
        llm_path = str((Path(final_directory) if final_directory is not None else d).resolve() / LLM_CONFIG_DIR)
    save_state_dict(state_dict, d / WEIGHTS_NAME)
    written.append(d / WEIGHTS_NAME)
    written.append(atomic_write_json(d / CONFIG_NAME, config.release_config(llm_path)))
    (d / LEGACY_WEIGHTS_NAME).unlink(missing_ok=True)
    return written


def has_pretrained_weights(directory: str | Path) -> bool:
    """Whether a directory holds a Show-o checkpoint's config and weights (current or earlier file name)."""
    d = Path(directory)
    return (d / CONFIG_NAME).is_file() and any((d / n).is_file() for n in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Partial rotary embedding of Phi (the first `dim` channels of each head rotate)."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: Optional[torch.device]) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim))

    def _apply(self, fn, recurse=True):
        # A model cast to bf16 (ours, or DeepSpeed's) keeps the rotary frequencies in fp32: in bf16 they would
        # be off by up to 0.4 %, i.e. whole radians at the image positions (> 1000).
        out = super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq(self.inv_freq.device)
        return out

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.dim], x[..., self.dim:]
        rot = rot * cos.to(x.dtype) + _rotate_half(rot) * sin.to(x.dtype)
        return torch.cat((rot, rest), dim=-1)


KV = tuple[torch.Tensor, torch.Tensor]

ATTENTION_PRECISIONS = ("model", "fp32")


class KVSlot:
    """One layer's preallocated key/value buffers [B, heads, text_len + image_len, head_dim]: the text prefix
    is written once, and each forward writes the image block's keys/values after it in place (no
    ``torch.cat`` of the prefix per layer per step). Inference only: the in-place writes are not differentiable."""

    __slots__ = ("k", "v", "start")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int):
        self.k, self.v, self.start = k, v, start

    def write(self, k: torch.Tensor, v: torch.Tensor) -> KV:
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError("a preallocated prefix cache is for inference (torch.no_grad()); training runs "
                               "through TextPrefix, whose keys/values stay in the autograd graph")
        self.k[:, :, self.start:].copy_(k)
        self.v[:, :, self.start:].copy_(v)
        return self.k, self.v


class PhiAttention(nn.Module):
    def __init__(self, arch: PhiArch):
        super().__init__()
        h, d = arch.hidden_size, arch.head_dim
        self.num_heads, self.head_dim = arch.num_attention_heads, d
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.dense = nn.Linear(h, h)
        self.q_layernorm = nn.LayerNorm(d, eps=arch.layer_norm_eps)
        self.k_layernorm = nn.LayerNorm(d, eps=arch.layer_norm_eps)
        self.attention_precision = "model"

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, past: "Optional[KV | KVSlot]" = None) -> tuple[torch.Tensor, KV]:
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q = self.q_layernorm(self.q_proj(x).view(shape)).transpose(1, 2)
        k = self.k_layernorm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        new_kv = (k, v)
        if isinstance(past, KVSlot):
            k, v = past.write(k, v)
        elif past is not None:
            k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
        if self.attention_precision == "fp32" and x.dtype != torch.float32:
            # The reference (Phi) computes attention in fp32 to avoid fp16 overflow of the scores.
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(x.dtype)
        else:
            # In the model's dtype: bf16 on GPUs reaches the fused kernels (flash / cuDNN / memory-efficient),
            # which accumulate the scores and the softmax in fp32 internally; QK LayerNorm bounds the scores.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(b, length, -1)), new_kv


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class PhiMLP(nn.Module):
    def __init__(self, arch: PhiArch):
        super().__init__()
        self.fc1 = nn.Linear(arch.hidden_size, arch.intermediate_size)
        self.fc2 = nn.Linear(arch.intermediate_size, arch.hidden_size)
        # phi-1.5's "gelu_new" is the tanh approximation: torch's fused kernel computes the same function (to float
        # rounding) in one pass and saves only its input for backward (transformers' Python formula: five tensors).
        self.act = _gelu_tanh if arch.hidden_act in ("gelu_new", "gelu_pytorch_tanh") else ACT2FN[arch.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    """Phi's parallel block: x + attn(ln(x)) + mlp(ln(x))."""

    def __init__(self, arch: PhiArch):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.self_attn = PhiAttention(arch)
        self.mlp = PhiMLP(arch)

    def forward(self, x, rope, cos, sin, mask, past=None):
        h = self.input_layernorm(x)
        attn, kv = self.self_attn(h, rope, cos, sin, mask, past)
        return x + attn + self.mlp(h), kv


class PhiModel(nn.Module):
    def __init__(self, arch: PhiArch, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(arch) for _ in range(arch.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(int(arch.partial_rotary_factor * arch.head_dim), arch.rope_theta)


class PhiForCausalLM(nn.Module):
    def __init__(self, arch: PhiArch, vocab_size: int):
        super().__init__()
        self.model = PhiModel(arch, vocab_size)
        self.lm_head = nn.Linear(arch.hidden_size, vocab_size)


@dataclass
class TextPrefix:
    """Keys/values of the text area, computed once per prompt and reused by every unmasking step."""
    kv: list[KV]                 # per layer, each [B, heads, text_len, head_dim]
    not_pad: torch.Tensor        # bool [B, text_len]

    def repeat_interleave(self, repeats: "int | torch.Tensor") -> "TextPrefix":
        """Each prompt's prefix `repeats` times (an int, or per-prompt counts: `policy.family.repeat_each`), e.g.
        for the G samples of a group or a sample's replayed steps."""
        if isinstance(repeats, int) and repeats == 1:
            return self
        return TextPrefix([(repeat_each(k, repeats), repeat_each(v, repeats)) for k, v in self.kv],
                          repeat_each(self.not_pad, repeats))

    @property
    def text_len(self) -> int:
        return int(self.not_pad.shape[1])

    @staticmethod
    def cat(prefixes: Sequence["TextPrefix"]) -> "TextPrefix":
        """Prefixes of several batches stacked along the batch."""
        kv = [(torch.cat([p.kv[i][0] for p in prefixes]), torch.cat([p.kv[i][1] for p in prefixes]))
              for i in range(len(prefixes[0].kv))]
        return TextPrefix(kv, torch.cat([p.not_pad for p in prefixes]))


class PrefixCache:
    """Text prefixes in preallocated per-layer key/value buffers, for an image block of `image_len` tokens (see
    `KVSlot`), with the attention mask of the image rows built once. The sampler's fixed-shape steps reuse it;
    inference only.

    `parts`: (prefix, repeats) pairs stacked along the batch; each row of a part's prefix fills `repeats`
    consecutive rows (the G samples of a prompt, or all rows of the unconditional prompt for CFG), written
    straight into the buffers (no repeated copy of the prefix is materialised first)."""

    def __init__(self, parts: Sequence[tuple[TextPrefix, int]], image_len: int):
        first = parts[0][0]
        text_len = first.text_len
        self.text_len, self.image_len = text_len, image_len
        self.batch = sum(p.not_pad.shape[0] * r for p, r in parts)
        self.slots: list[KVSlot] = []
        for layer in range(len(first.kv)):
            k0 = first.kv[layer][0]
            shape = (self.batch, k0.shape[1], text_len + image_len, k0.shape[3])
            kb = torch.empty(shape, dtype=k0.dtype, device=k0.device)
            vb = torch.empty(shape, dtype=k0.dtype, device=k0.device)
            offset = 0
            for prefix, repeats in parts:
                k, v = prefix.kv[layer]
                rows = k.shape[0] * repeats
                for buf, src in ((kb, k), (vb, v)):
                    dst = buf[offset:offset + rows, :, :text_len].view(k.shape[0], repeats, *src.shape[1:])
                    dst.copy_(src.unsqueeze(1).expand(-1, repeats, -1, -1, -1))
                offset += rows
            self.slots.append(KVSlot(kb, vb, text_len))
        not_pad = torch.cat([p.not_pad.repeat_interleave(r, 0) for p, r in parts])
        self.mask = torch.cat([not_pad, torch.ones(self.batch, image_len, dtype=torch.bool, device=not_pad.device)],
                              dim=1).view(self.batch, 1, 1, -1)


@dataclass
class FullText:
    """The context without prefix reuse: each row's text area, run with the image block in one full pass."""
    text: torch.Tensor           # long [R, text_len]


class Showo(MaskedModel):
    """Show-o for text-to-image: full-sequence logits, and image-block logits with a reusable text prefix.

    As a `policy.family.MaskedModel`: the condition is the t2i text area ``{"ids": long [B, text_len]}``, the
    context the text prefix's keys/values (a preallocated `PrefixCache` while sampling, a `TextPrefix` in the
    autograd graph while training, or the text itself without prefix reuse); the step does not enter the logits."""

    family = "showo"
    weight_files = (WEIGHTS_NAME,)
    # Phi's linear layers. Not `lm_head`: its weight is sliced for the codebook logits (`codebook_logits`), past
    # any adapter's forward.
    lora_targets = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    lora_note = ("lm_head's weight is read directly for the codebook logits, so an adapter there would be "
                 "bypassed")

    def __init__(self, config: ShowoConfig):
        super().__init__()
        self.config = config
        self.layout = config.layout
        self.showo = PhiForCausalLM(config.phi, config.vocab_size)
        self.gradient_checkpointing = False

    # ----- the policy interface (policy.family.MaskedModel) ------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.layout.num_vq_tokens

    @property
    def codebook_size(self) -> int:
        return self.layout.codebook_size

    def context(self, parts: Sequence[tuple[Condition, int]], inference: bool, reuse: bool = True):
        if not reuse:
            return FullText(torch.cat([repeat_each(c["ids"], r) for c, r in parts]))
        if inference:
            return self.prefix_cache(*[(self.encode_text(c["ids"]), r) for c, r in parts])
        prefixes = []
        for c, r in parts:
            prefix = self.encode_text(c["ids"])
            # one row (the usual learner micro-batch at large T): the batch-1 prefix is expanded in
            # `image_logits`, not copied r times
            prefixes.append(prefix if len(parts) == 1 and c["ids"].shape[0] == 1 else prefix.repeat_interleave(r))
        return prefixes[0] if len(prefixes) == 1 else TextPrefix.cat(prefixes)

    def logits(self, context, codes: torch.Tensor, steps: torch.Tensor | int, num_steps: int) -> torch.Tensor:
        if isinstance(context, FullText):
            return self.image_logits_full(context.text, codes)
        return self.image_logits(context, codes)

    @staticmethod
    def guidance_weight(scale: float) -> float:
        return float(scale)             # Show-o's (1 + s)·cond − s·uncond

    @staticmethod
    def remask_temperature(temperature: float, step: int, num_steps: int) -> float:
        # annealed linearly, temperature·(1 − (t+1)/T) (the reference compounds the factor step by step; MaskGIT
        # and this sampler do not)
        return temperature * (1.0 - (step + 1) / num_steps)

    def zero3_external_parameters(self) -> list[nn.Parameter]:
        head = self.showo.lm_head       # read directly (codebook slice), outside lm_head.forward
        return [head.weight, head.bias]

    def activation_bytes_per_row(self, checkpointing: bool) -> float:
        return self.config.activation_bytes_per_row(checkpointing)

    def padding_condition(self) -> Condition:
        return {"ids": self.layout.empty_text_area(1)}

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def write_pretrained(self, directory: str | Path, state_dict: Optional[dict[str, torch.Tensor]] = None,
                         final_directory: str | Path | None = None) -> list[Path]:
        return write_pretrained(directory, self.state_dict() if state_dict is None else state_dict, self.config,
                                final_directory)

    # ----- precision -----------------------------------------------------------------------------------------
    @property
    def attention_precision(self) -> str:
        """"model": attention in the parameters' dtype (fused bf16 kernels on GPUs); "fp32": scores, softmax and
        the weighted sum in fp32 as the reference Phi. The same for fp32 models."""
        return self.showo.model.layers[0].self_attn.attention_precision if len(self.showo.model.layers) else "model"

    @attention_precision.setter
    def attention_precision(self, value: str) -> None:
        if value not in ATTENTION_PRECISIONS:
            raise ValueError(f"attention_precision must be one of {ATTENTION_PRECISIONS}, not {value!r}")
        for layer in self.showo.model.layers:
            layer.self_attn.attention_precision = value

    # ----- building blocks -------------------------------------------------------------------------------
    def _run_layers(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                    past: "Optional[list[KV] | list[KVSlot]]" = None,
                    keep_kv: bool = True) -> tuple[torch.Tensor, list[KV]]:
        rope = self.showo.model.rotary_emb
        cos, sin = rope(positions)
        kvs: list[KV] = []
        for i, layer in enumerate(self.showo.model.layers):
            p = past[i] if past is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, kv = checkpoint(layer, x, rope, cos, sin, mask, p, use_reentrant=False)
            else:
                x, kv = layer(x, rope, cos, sin, mask, p)
            if keep_kv:
                kvs.append(kv)
        return self.showo.model.final_layernorm(x), kvs

    def codebook_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the image codebook only (the sampler's and the loss's softmax excludes text and mask)."""
        lo, hi = self.layout.image_offset, self.layout.mask_id
        head = self.showo.lm_head
        return F.linear(hidden, head.weight[lo:hi], head.bias[lo:hi])

    # ----- public API ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-vocabulary logits [B, L, V]. `attention_mask`: bool (True = attend) or additive float
        [B, 1, L, L]; default: omni-attention for t2i sequences."""
        if attention_mask is None:
            attention_mask = omni_attention_mask(input_ids, self.layout)
        elif attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.float().clamp(min=torch.finfo(torch.float32).min)
        x = self.showo.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden, _ = self._run_layers(x, positions, attention_mask, keep_kv=False)
        return self.showo.lm_head(hidden)

    def encode_text(self, text_area: torch.Tensor) -> TextPrefix:
        """Keys/values of the text area [B, text_len] (causal; independent of the image tokens)."""
        length = text_area.shape[1]
        x = self.showo.model.embed_tokens(text_area)
        positions = torch.arange(length, device=text_area.device)
        _, kvs = self._run_layers(x, positions, omni_attention_mask(text_area, self.layout))
        return TextPrefix(kvs, text_area != self.layout.pad_id)

    def prefix_cache(self, *parts: tuple[TextPrefix, int]) -> PrefixCache:
        """(prefix, repeats) parts in preallocated key/value buffers (the sampler's steps; inference only)."""
        return PrefixCache(parts, self.layout.num_vq_tokens + 2)

    def image_logits(self, prefix: "TextPrefix | PrefixCache", codes: torch.Tensor) -> torch.Tensor:
        """Codebook logits [B, N, C] at the image positions, given the text prefix and current codes [B, N]
        (-1 = masked). A `TextPrefix`'s batch must be B or 1; a `PrefixCache`'s must be B."""
        block = self.layout.image_block(codes)
        b, n2 = block.shape
        if isinstance(prefix, PrefixCache):
            if (prefix.batch, prefix.image_len) != (b, n2):
                raise ValueError(f"prefix cache for {prefix.batch} rows x {prefix.image_len} image tokens, "
                                 f"got {b} x {n2}")
            text_len, mask, past = prefix.text_len, prefix.mask, prefix.slots
        else:
            text_len = prefix.text_len
            not_pad = prefix.not_pad.expand(b, -1)
            mask = torch.cat([not_pad, torch.ones(b, n2, dtype=torch.bool, device=block.device)],
                             dim=1).view(b, 1, 1, -1)
            past = prefix.kv
        positions = torch.arange(text_len, text_len + n2, device=block.device)
        x = self.showo.model.embed_tokens(block)
        hidden, _ = self._run_layers(x, positions, mask, past=past, keep_kv=False)
        return self.codebook_logits(hidden[:, 1:-1])

    def image_logits_full(self, text_area: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The same logits as `image_logits`, by one pass over the whole sequence (no prefix reuse)."""
        ids = self.layout.sequence(text_area, codes)
        x = self.showo.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden, _ = self._run_layers(x, positions, omni_attention_mask(ids, self.layout), keep_kv=False)
        return self.codebook_logits(hidden[:, self.layout.text_len + 1:-1])

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def load_released_state_dict(self, state_dict: dict[str, torch.Tensor], what: str = "Show-o checkpoint") -> None:
        load_strict(self, state_dict, what)

    @staticmethod
    def from_pretrained(path: str | Path, config: ShowoConfig | None = None, phi_config: str | Path | None = None,
                        max_seq_length: int | None = None) -> "Showo":
        """Load a Show-o checkpoint directory (a release, one saved by Show-o's code, or ours: config.json +
        pytorch_model.safetensors / pytorch_model.bin / model.safetensors / shards), or a plain state-dict file
        such as the Mask-GRPO authors' `mycheckpoint.pth` (then `config` must be given). Without `phi_config`
        the Phi sizes of a directory lacking our ``phi`` entry are read from its tensors (see
        `ShowoConfig.from_release`)."""
        p = Path(path).expanduser()
        if not p.exists():
            raise CheckpointError(f"Show-o checkpoint {str(p)!r} does not exist: give the local path of "
                                  f"showlab/show-o, showlab/show-o-512x512 or a mycheckpoint.pth")
        if config is None and p.is_file():
            raise CheckpointError(f"{str(p)!r} is a plain state dict: also give the model config "
                                  f"(policy.config or the release's config.json) to build the model")
        if config is None and not (p / CONFIG_NAME).is_file():
            ShowoConfig.from_release(p)     # raises the missing-config.json error before reading any weights
        state_dict = read_state_dict(p)
        if config is None:
            config = ShowoConfig.from_release(p, phi_config=phi_config, max_seq_length=max_seq_length,
                                              tensor_shapes={k: v.shape for k, v in state_dict.items()})
        model = Showo(config)
        model.load_released_state_dict(state_dict, what=f"Show-o checkpoint {str(p)!r}")
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """A directory Show-o's own `Showo.from_pretrained` and ours both open (see `write_pretrained`)."""
        self.write_pretrained(directory)
