"""Meissonic as a policy family (`policy.family: meissonic`): our MM-DiT transformer (the trained network), the
release's CLIP text encoder (frozen) and VQ decoder, and the release's unmasking rule and guidance.

Condition: the text encoder's two outputs, ``{"pooled": [B, pooled_projection_dim], "hidden": [B, 77,
joint_attention_dim]}`` (77: CLIP's positions, `MeissonicArch.text_length`), computed once per prompt on the rollout worker (the learner never loads the text encoder:
trajectories carry the embeddings). The null condition is the negative prompt's (the empty prompt by default, as
the pipeline). No context beyond the embeddings: the logits of a step are one pass of the transformer over [text,
image] tokens, at the release's timestep ``T − 1 − t`` and the config's micro-conditions.

Guidance: the pipeline's ``uncond + s·(cond − uncond)`` for s > 1 is ``(1 + w)·cond − w·uncond`` with w = s − 1.
Re-masking temperature: the scheduler's ``linspace(temperature, 0, T)[t]`` (the release: (2, 0)).

Layout: a release or checkpoint directory holds ``transformer/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``, the released names: what we train and write), ``text_encoder/``,
``tokenizer/``, ``vqvae/`` and ``scheduler/``; each component path of the config (`policy.text_encoder`,
`policy.tokenizer.path`, `policy.decoder.path`) defaults to its folder of `policy.init`. Without a text encoder
anywhere (a random policy for tests, the shapes world) a random CLIP text encoder of `policy.arch.text_encoder`'s
sizes is built from `policy.init_seed`; `maskgrpo pretrain` writes it beside the transformer, so the base is a
complete directory in the released layout.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from policy.family import Condition, Conditioner, ImageDecoder, MaskedModel, PolicyFamily, repeat_each
from policy.files import atomic_write_json
from policy.hub import is_hub_id, resolve_path
from policy.weights import CheckpointError, load_strict, read_state_dict, save_state_dict

from .text import TEXT_LENGTH, MeissonicTextEncoder, load_clip_tokenizer, pad_token_ids, tokenize
from .transformer import CONFIG_NAME, WEIGHTS_NAME, MeissonicTransformer, MeissonicTransformerConfig
from .vq import MeissonicVQDecoder

TRANSFORMER, TEXT_ENCODER, TOKENIZER, VQVAE, SCHEDULER = "transformer", "text_encoder", "tokenizer", "vqvae", "scheduler"


@dataclass
class ClipTextArch:
    """A CLIP text encoder's sizes, for a random one (tests, the shapes world); a ``text_encoder/`` directory
    brings its own config. Defaults: the release's (CLIP-ViT-H/14's text tower)."""
    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    projection_dim: int = 1024
    max_position_embeddings: int = TEXT_LENGTH     # also the padded prompt length (the pipeline's 77)
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    hidden_act: str = "gelu"

    def hf_config(self):
        from transformers import CLIPTextConfig
        return CLIPTextConfig(**asdict(self))


@dataclass
class MeissonicArch:
    """`policy.arch` of a Meissonic policy: the transformer's config.json keys, the text encoder's sizes (random
    text encoders only), the code grid and the micro-conditions the pipeline passes. Defaults: the 1024² release."""
    transformer: MeissonicTransformerConfig = field(default_factory=MeissonicTransformerConfig)
    text_encoder: ClipTextArch = field(default_factory=ClipTextArch)
    grid_size: int = 64                 # codes per side (1024 px / the VQ's 16 px per code)
    image_size: int = 1024              # pixels per side: the micro-conditions' width and height
    crop: list[int] = field(default_factory=lambda: [0, 0])      # micro-conditioning crop coordinates
    aesthetic_score: float = 6.0        # micro-conditioning aesthetic score (the pipeline's default)

    def __post_init__(self) -> None:
        if isinstance(self.transformer, dict):
            self.transformer = MeissonicTransformerConfig.from_dict(self.transformer)
        if isinstance(self.text_encoder, dict):
            self.text_encoder = ClipTextArch(**self.text_encoder)
        self.crop = [int(c) for c in self.crop]
        problems = []
        if self.grid_size < 1 or len(self.crop) != 2:
            problems.append("policy.arch.grid_size must be >= 1 and policy.arch.crop two integers")
        elif self.transformer.downsample and self.grid_size % 2:
            problems.append(f"policy.arch.grid_size={self.grid_size}: the downsampling transformer needs an even grid")
        if self.text_encoder.hidden_size != self.transformer.joint_attention_dim:
            problems.append(f"policy.arch.text_encoder.hidden_size={self.text_encoder.hidden_size} must equal the "
                            f"transformer's joint_attention_dim={self.transformer.joint_attention_dim}")
        if problems:
            raise ValueError("\n  - ".join(problems))

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def text_length(self) -> int:
        """Token ids per prompt: CLIP's positions (77 in the release, whose pipeline pads to max_length 77)."""
        return self.text_encoder.max_position_embeddings

    def micro_conditions(self) -> list[float]:
        """[width, height, crop_x, crop_y, aesthetic_score], the pipeline's order."""
        return [float(self.image_size), float(self.image_size), float(self.crop[0]), float(self.crop[1]),
                float(self.aesthetic_score)]

    def to_dict(self) -> dict[str, Any]:
        return {"transformer": self.transformer.to_dict(), "text_encoder": asdict(self.text_encoder),
                "grid_size": self.grid_size, "image_size": self.image_size, "crop": list(self.crop),
                "aesthetic_score": self.aesthetic_score}


class MeissonicPolicy(MeissonicTransformer, MaskedModel):
    """The transformer as a `policy.family.MaskedModel` (its parameters keep the released names)."""

    family = "meissonic"
    weight_files = (f"{TRANSFORMER}/{WEIGHTS_NAME}",)
    # the attention projections of both streams and the MLPs (FLUX-style LoRA); not the adaLN modulations,
    # the embedders or the MLM head
    schedule_precision = "float32"      # as the release's scheduler (torch float32 cos; see `sampler.masked_counts`)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "net.0.proj", "net.2", "proj_mlp", "proj_out")

    def __init__(self, arch: MeissonicArch):
        super().__init__(arch.transformer)
        self.arch = arch
        self._micro: dict[torch.device, torch.Tensor] = {}

    # ----- the policy interface ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.arch.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size - 1     # as released (the scheduler's mask_token_id)

    def context(self, parts: Sequence[tuple[Condition, int]], inference: bool, reuse: bool = True) -> Condition:
        if len(parts) == 1 and parts[0][0]["pooled"].shape[0] == 1:        # one row: a view, not r copies
            c, r = parts[0]
            n = r if isinstance(r, int) else int(r.sum())                  # host counts: no device read
            return {k: v.expand(n, *v.shape[1:]) for k, v in c.items()}
        return {k: torch.cat([repeat_each(c[k], r) for c, r in parts]) for k in ("pooled", "hidden")}

    def logits(self, context: Condition, codes: torch.Tensor, steps: torch.Tensor | int, num_steps: int) -> torch.Tensor:
        rows, g = codes.shape[0], self.arch.grid_size
        grid = torch.where(codes < 0, self.mask_id, codes).view(rows, g, g)
        if isinstance(steps, torch.Tensor):                  # the release's timestep: T − 1 − t
            timestep = (num_steps - 1) - steps.to(torch.float32)
        else:
            timestep = torch.full((rows,), float(num_steps - 1 - steps), device=codes.device)
        micro = self._micro_conds(codes.device).expand(rows, -1)
        logits = self(grid, micro, context["pooled"], context["hidden"], timestep)      # [R, C, g, g]
        return logits.permute(0, 2, 3, 1).reshape(rows, g * g, -1)

    def _micro_conds(self, device: torch.device) -> torch.Tensor:
        """float32 [1, 5], kept per device: made once, not copied to the GPU at every step."""
        t = self._micro.get(device)
        if t is None:
            t = self._micro[device] = torch.tensor([self.arch.micro_conditions()], device=device)
        return t

    @staticmethod
    def guidance_weight(scale: float) -> float:
        return float(scale) - 1.0 if scale > 1.0 else 0.0     # uncond + s·(cond − uncond), on for s > 1

    @staticmethod
    def remask_temperature(temperature: float, step: int, num_steps: int) -> float:
        return float(torch.linspace(temperature, 0.0, num_steps)[step])     # the scheduler's temperatures

    def activation_bytes_per_row(self, checkpointing: bool) -> float:
        """Per block and token ~(16·width + 3·4·width) saved values (norm inputs, q/k/v before and after their
        norms and the rotary, attention in/out, MLP in/out), bf16; the text tokens run through every block too
        (in both streams of a dual-stream block); with checkpointing each block's input plus one block's
        activations. Plus the [N, C] logits, fp32 log-probs and their gradient."""
        cfg, d = self.config, self.config.inner_dim
        image = self.arch.num_tokens // (4 if cfg.downsample else 1)
        tokens = image + self.arch.text_length
        blocks = cfg.num_layers + cfg.num_single_layers
        one_block = tokens * (16 * d + 12 * d) * 2.0
        saved = blocks * tokens * d * 2.0 + one_block if checkpointing else blocks * one_block
        return saved + self.arch.num_tokens * (d * 2 * 4 + cfg.codebook_size * (2 + 4 + 4))

    def padding_condition(self) -> Condition:
        cfg = self.config
        return {"pooled": torch.zeros(1, cfg.pooled_projection_dim),
                "hidden": torch.zeros(1, self.arch.text_length, cfg.joint_attention_dim)}

    def config_dict(self) -> dict[str, Any]:
        return self.arch.to_dict()

    def write_pretrained(self, directory: str | Path, state_dict: Optional[dict[str, torch.Tensor]] = None,
                         final_directory: str | Path | None = None) -> list[Path]:
        """``transformer/`` (config.json + diffusion_pytorch_model.safetensors, the released names) and
        ``scheduler/scheduler_config.json`` (the release's mask id and cosine schedule), so that the authors'
        pipeline opens the directory's transformer and scheduler."""
        d = Path(directory)
        (d / TRANSFORMER).mkdir(parents=True, exist_ok=True)
        save_state_dict(self.state_dict() if state_dict is None else state_dict, d / TRANSFORMER / WEIGHTS_NAME)
        return [d / TRANSFORMER / WEIGHTS_NAME,
                atomic_write_json(d / TRANSFORMER / CONFIG_NAME, self.config.release_config()),
                atomic_write_json(d / SCHEDULER / "scheduler_config.json",
                                  {"_class_name": "Scheduler", "mask_token_id": self.mask_id,
                                   "masking_schedule": "cosine"})]

    def save_pretrained(self, directory: str | Path) -> list[Path]:
        return self.write_pretrained(directory)


class MeissonicConditioner(Conditioner):
    """Prompts -> CLIP ids (the pipeline's padding to 77) -> the frozen text encoder's (pooled, penultimate hidden)
    on the policy's device and dtype."""

    def __init__(self, ids_of, encoder: MeissonicTextEncoder, device: torch.device | str, dtype: torch.dtype,
                 random_encoder: bool):
        self.ids_of, self.encoder, self.device = ids_of, encoder, torch.device(device)
        self.encoder.to(device=self.device, dtype=dtype)
        self.random_encoder = random_encoder

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Condition:
        pooled, hidden = self.encoder(self.ids_of(list(prompts)).to(self.device))
        return {"pooled": pooled, "hidden": hidden}

    def null(self, negative_prompt: str = "") -> Condition:
        return self([negative_prompt])

    def save_pretrained(self, directory: str | Path) -> None:
        """The text encoder into ``directory/text_encoder`` (a random one: so a pretrained base is complete)."""
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()        # one line per shard would clutter the run's log
        self.encoder.model.save_pretrained(str(Path(directory) / TEXT_ENCODER))


def component(cfg: Any, given: Optional[str], folder: str, key: str) -> Optional[Path]:
    """A component's directory: the path or Hub id the config gives, else `folder` of `policy.init` when it holds
    one, else None."""
    if given:
        return resolve_path(given, key)
    if cfg.init not in ("random", "pretrained"):
        root = resolve_path(cfg.init, "policy.init")
        if (root / folder).is_dir():
            return root / folder
    return None


class MeissonicFamily(PolicyFamily):
    name = "meissonic"
    arch_class = MeissonicArch
    model_class = MeissonicPolicy

    # ----- the trained network ---------------------------------------------------------------------------------
    def build_model(self, cfg: Any) -> MeissonicPolicy:
        if cfg.init == "random":
            torch.manual_seed(cfg.init_seed)
            return MeissonicPolicy(cfg.arch)
        path = resolve_path(cfg.init, "policy.init")
        arch, weights = cfg.arch, path
        if path.is_dir():
            folder = path / TRANSFORMER if (path / TRANSFORMER / CONFIG_NAME).is_file() else path
            if not (folder / CONFIG_NAME).is_file():
                raise CheckpointError(f"policy.init={cfg.init!r}: no {TRANSFORMER}/{CONFIG_NAME} there: a Meissonic "
                                      f"release or checkpoint holds transformer/ (config.json + {WEIGHTS_NAME})")
            arch = replace(cfg.arch, transformer=MeissonicTransformerConfig.from_file(folder / CONFIG_NAME))
            weights = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder
        state_dict = read_state_dict(weights)
        with torch.device("meta"):
            model = MeissonicPolicy(arch)
        model = model.to_empty(device="cpu")     # no random initialisation of weights that are overwritten
        load_strict(model, state_dict, f"Meissonic transformer of policy.init={cfg.init!r}")
        return model

    def arch_from_directory(self, path: Path, cfg: Any) -> Optional[tuple[MeissonicArch, str]]:
        folder = path / TRANSFORMER if (path / TRANSFORMER / CONFIG_NAME).is_file() else path
        if not (folder / CONFIG_NAME).is_file():
            return None
        t = MeissonicTransformerConfig.from_file(folder / CONFIG_NAME)
        text, text_config = cfg.arch.text_encoder, path / TEXT_ENCODER / CONFIG_NAME
        if text_config.is_file():
            raw = json.loads(text_config.read_text())
            text = ClipTextArch(**{k: raw[k] for k in asdict(text) if k in raw})
        arch = replace(cfg.arch, transformer=t, text_encoder=text)
        return arch, (f"{t.num_layers} dual- and {t.num_single_layers} single-stream blocks, width {t.inner_dim}, "
                      f"codebook {t.codebook_size}{', downsampling' if t.downsample else ''}")

    def has_weights(self, directory: Path) -> bool:
        return (directory / TRANSFORMER / WEIGHTS_NAME).is_file() or (
            (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file())

    # ----- conditioning and decoding -----------------------------------------------------------------------------
    def build_conditioner(self, cfg: Any, model: MaskedModel, device: torch.device | str,
                          dtype: torch.dtype) -> MeissonicConditioner:
        te = cfg.arch.text_encoder
        folder = component(cfg, cfg.text_encoder, TEXT_ENCODER, "policy.text_encoder")
        if folder is not None:
            encoder, random_encoder = MeissonicTextEncoder.from_pretrained(folder), False
        else:
            from transformers import CLIPTextModelWithProjection
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.init_seed + 1)
                encoder = MeissonicTextEncoder(CLIPTextModelWithProjection(te.hf_config()).eval().requires_grad_(False))
            random_encoder = True
        return MeissonicConditioner(self._ids_of(cfg), encoder, device, dtype, random_encoder)

    def _ids_of(self, cfg: Any):
        """prompts -> long [B, 77] CLIP ids (the release's CLIPTokenizer, or the words of `policy.tokenizer`)."""
        from policy.factory import TokenizerKind, build_word_tokenizer
        if cfg.tokenizer.kind == TokenizerKind.hf:
            folder = component(cfg, cfg.tokenizer.path, TOKENIZER, "policy.tokenizer.path")
            if folder is None:
                raise CheckpointError("policy.tokenizer.kind=hf needs policy.tokenizer.path (a CLIP tokenizer "
                                      "directory or Hub id) or a policy.init that holds tokenizer/")
            tokenizer = load_clip_tokenizer(folder)
            return lambda prompts: tokenize(tokenizer, prompts, cfg.arch.text_length)
        te = cfg.arch.text_encoder
        words = build_word_tokenizer(cfg, min(te.bos_token_id, te.eos_token_id, te.pad_token_id))
        return lambda prompts: pad_token_ids(words(prompts), te.bos_token_id, te.eos_token_id, te.pad_token_id,
                                             cfg.arch.text_length)

    def build_decoder(self, cfg: Any, device: torch.device | str = "cpu") -> ImageDecoder:
        from policy.factory import DecoderKind
        if cfg.decoder.kind != DecoderKind.vqvae:
            raise ValueError(f"policy.decoder.kind={cfg.decoder.kind!r}: Meissonic decodes with 'vqvae' or 'shapes'")
        folder = component(cfg, cfg.decoder.path, VQVAE, "policy.decoder.path")
        if folder is None:
            raise CheckpointError("policy.decoder.kind=vqvae needs policy.decoder.path (a vqvae/ directory or Hub "
                                  "id) or a policy.init that holds vqvae/")
        vq = MeissonicVQDecoder.from_pretrained(folder).to(device)
        g = cfg.arch.grid_size
        return _VQDecode(vq, (g, g))

    # ----- checks ------------------------------------------------------------------------------------------------------
    def config_problems(self, cfg: Any) -> list[str]:
        from policy.factory import DecoderKind
        problems = []
        if cfg.decoder.kind == DecoderKind.magvit:
            problems.append("policy.decoder.kind=magvit is Show-o's decoder: Meissonic decodes with 'vqvae' (its "
                            "vqvae/ folder) or 'shapes'")
        for key, value in (("policy.text_encoder", cfg.text_encoder), ("policy.tokenizer.path", cfg.tokenizer.path),
                           ("policy.decoder.path", cfg.decoder.path)):
            if value and not Path(value).expanduser().exists() and not is_hub_id(value):
                problems.append(f"{key}={value!r} does not exist (a local directory or a Hub id)")
        if cfg.phi_config is not None or cfg.max_seq_length is not None:
            problems.append("policy.phi_config / policy.max_seq_length are Show-o's: remove them")
        return problems

    def prompt_token_counts(self, cfg: Any, prompts: Sequence[str]) -> tuple[list[int], int, str]:
        from policy.factory import TokenizerKind, build_word_tokenizer
        if cfg.tokenizer.kind == TokenizerKind.hf:
            folder = component(cfg, cfg.tokenizer.path, TOKENIZER, "policy.tokenizer.path")
            if folder is None:
                return [0] * len(prompts), cfg.arch.text_length, "the text encoder's positions"
            ids = load_clip_tokenizer(folder)(list(prompts), add_special_tokens=False).input_ids
        else:
            te = cfg.arch.text_encoder
            ids = build_word_tokenizer(cfg, min(te.bos_token_id, te.eos_token_id, te.pad_token_id))(list(prompts))
        return ([len(t) + 2 for t in ids], cfg.arch.text_length,
                f"the text encoder's {cfg.arch.text_length} positions (policy.arch.text_encoder.max_position_embeddings)")

    def rollout_bytes_per_sample(self, arch: MeissonicArch, steps: int, guided: bool) -> int:
        """The trajectory record, the sample's condition (77 hidden states), and one forward pass in float32: the
        residual stream and q/k/v of [text, image] tokens (six width-wide copies), then the widest stage (the MLP's
        4x width twice, the attention scores per head twice, or four copies of the codebook logits)."""
        t = arch.transformer
        n, d = arch.num_tokens, t.inner_dim
        seq = n // (4 if t.downsample else 1) + arch.text_length
        trajectory = steps * n * (8 + 4 + 4) + n * 8 + 4 * (arch.text_length * t.joint_attention_dim + d)
        widest = max(4 * n * t.codebook_size, 2 * seq * 4 * d, 2 * t.num_attention_heads * seq * seq)
        forward = 4 * (6 * seq * d + widest)
        return trajectory * (2 if guided else 1) + forward * (2 if guided else 1)

    def component_paths(self, cfg: Any, init: Path) -> dict[str, str]:
        """The component folders of a release or checkpoint directory that the config leaves unset, so that the
        run's config.yaml names them (a later `maskgrpo eval --checkpoint` of a training checkpoint, which holds
        only the transformer, still finds the text encoder it trained with)."""
        from policy.factory import DecoderKind, TokenizerKind
        out = {}
        if not cfg.text_encoder and (init / TEXT_ENCODER).is_dir():
            out["text_encoder"] = str(init / TEXT_ENCODER)
        if cfg.tokenizer.kind == TokenizerKind.hf and not cfg.tokenizer.path and (init / TOKENIZER).is_dir():
            out["tokenizer.path"] = str(init / TOKENIZER)
        if cfg.decoder.kind == DecoderKind.vqvae and not cfg.decoder.path and (init / VQVAE).is_dir():
            out["decoder.path"] = str(init / VQVAE)
        return out


class _VQDecode:
    """codes long [B, N] -> uint8 [B, H, W, 3] on the decoder's device (results on the CPU)."""

    def __init__(self, vq: MeissonicVQDecoder, grid: tuple[int, int]):
        self.vq, self.grid = vq, grid
        self.device = next(vq.parameters()).device

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_uint8(codes.to(self.device), self.grid).cpu()


MEISSONIC = MeissonicFamily()
