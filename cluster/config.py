"""The run configuration: OmegaConf YAML + `key=value` overrides, checked against a typed schema up front.

Unknown keys, wrong types, missing paths and malformed values fail here, before any actor starts, with a message
that names the key and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from policy.factory import PolicyConfig
from policy.sampler import SamplerConfig
from rewards.base import reward_names

from .prompts import PromptFileError, read_prompts


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and how to fix it."""


@dataclass
class DataConfig:
    train_prompts: Optional[str] = None   # .txt (one prompt a line), .jsonl (GenEval metadata or {"prompt": ...}),
                                          # .parquet (a `prompt` column); None: the shapes world's train split
    eval_prompts: Optional[str] = None    # GenEval metadata .jsonl; None: the shapes world's held-out split
    prompts_per_step: int = 4             # prompts (GRPO groups) per training step
    group_size: int = 6                   # G samples per prompt
    eval_max_prompts: int = 0             # 0: all evaluation prompts


@dataclass
class ClusterConfig:
    address: Optional[str] = None         # Ray address; None: start a local Ray instance (single-node mode)
    num_rollout_workers: int = 1
    num_reward_actors: int = 1
    num_learner_ranks: int = 1
    rollout_gpus: float = 0.0             # GPUs per rollout worker (fractions allowed)
    reward_gpus: float = 0.0
    learner_gpus: float = 0.0             # GPUs per learner rank (1 on a GPU cluster)
    cpus_per_actor: float = 1.0
    max_staleness: int = 0                # 0: synchronous (the paper); n: workers may run n versions ahead
    weight_sync: str = "collective"       # "collective" (NCCL/gloo group) or "object_store"
    weight_bucket_mb: int = 64
    max_restarts: int = 2
    local_num_cpus: Optional[int] = None  # CPUs given to a local Ray instance


@dataclass
class PretrainConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    caption_noise: float = 0.3            # fraction of scenes paired with another prompt of the same category
    output: Optional[str] = None          # where the base checkpoint goes (default: <output_dir>/base)


@dataclass
class EvalConfig:
    at_start: bool = True
    every: int = 0                        # also every N steps (0: only at step 0 and at the last step)
    samples_per_prompt: int = 1
    guidance_scale: float = 0.0
    rewards: list[dict[str, Any]] = field(default_factory=list)   # empty: the training rewards


@dataclass
class LoggingConfig:
    sample_every: int = 0                 # image grid every N steps (0: first and last step only)
    tensorboard: bool = False
    wandb_project: Optional[str] = None
    progress: bool = True


def _learner_config_cls():
    from learner.config import LearnerConfig
    return LearnerConfig


def _default_rewards() -> list[dict[str, Any]]:
    return [{"name": "geneval", "weight": 1.0, "detector": {"name": "shapes"}}]


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 20
    resume: Optional[str] = None          # "auto": the last good checkpoint of output_dir; or a checkpoint path
    device: str = "auto"                  # "auto" (cuda if available), "cpu", "cuda"
    save_every: int = 0                   # checkpoint every N steps (0: at the end only)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    learner: Any = None                   # learner.config.LearnerConfig, filled in by `schema()`
    rewards: list[dict[str, Any]] = field(default_factory=_default_rewards)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def schema() -> DictConfig:
    base = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(base, False)
    base.learner = OmegaConf.structured(_learner_config_cls())
    OmegaConf.set_struct(base, True)
    for free_form in (base.policy.decoder.shapes, base.learner.extra_deepspeed):  # keyword dicts, not schema
        OmegaConf.set_struct(free_form, False)
    return base


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema ← YAML file ← `key=value` overrides, validated. Raises ConfigError with the key at fault."""
    cfg = schema()
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {str(p)!r} not found (see configs/ for examples)")
            try:
                loaded = OmegaConf.load(p)
            except Exception as e:  # yaml syntax errors
                raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
            cfg = OmegaConf.merge(cfg, loaded)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"invalid config{f' at {key!r}' if key else ''}: {e.msg if hasattr(e, 'msg') else e}\n"
                          f"  fix: check the key's spelling and type against cluster/config.py") from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Semantic checks that the schema's types cannot express."""
    problems = []
    if cfg.max_steps < 0:
        problems.append("max_steps must be >= 0")
    if cfg.data.group_size < 2:
        problems.append("data.group_size must be >= 2 (GRPO normalises rewards within a group)")
    if cfg.data.prompts_per_step < 1:
        problems.append("data.prompts_per_step must be >= 1")
    elif cfg.data.prompts_per_step % cfg.cluster.num_learner_ranks:
        problems.append("data.prompts_per_step must be a multiple of cluster.num_learner_ranks (each rank trains "
                        "on whole groups)")
    for key in ("num_rollout_workers", "num_reward_actors", "num_learner_ranks"):
        if cfg.cluster[key] < 1:
            problems.append(f"cluster.{key} must be >= 1")
    if cfg.cluster.max_staleness < 0:
        problems.append("cluster.max_staleness must be >= 0")
    if cfg.cluster.weight_sync not in ("collective", "object_store"):
        problems.append("cluster.weight_sync must be 'collective' or 'object_store'")
    if cfg.device not in ("auto", "cpu", "cuda"):
        problems.append("device must be 'auto', 'cpu' or 'cuda'")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        problems.append(f"resume={cfg.resume!r}: no such checkpoint (use resume=auto or a checkpoints/step_N path)")
    for key in ("train_prompts", "eval_prompts"):
        value = cfg.data[key]
        if value is None:
            continue
        if not Path(value).is_file():
            problems.append(f"data.{key}={value!r} does not exist")
            continue
        try:                               # read now: a malformed file fails here, not after the actors start
            read_prompts(value)
        except PromptFileError as e:
            problems.append(f"data.{key}: {e}")
    init = cfg.policy.init
    if init not in ("random", "pretrained") and not Path(init).expanduser().exists():
        problems.append(f"policy.init={init!r} does not exist: give 'random', 'pretrained' (the shapes-world "
                        f"base, pretrained on first use) or the local path of a Show-o release / checkpoint")
    for key in ("phi_config",):
        value = cfg.policy[key]
        if value is not None and not Path(value).is_file():
            problems.append(f"policy.{key}={value!r} does not exist")
    if cfg.policy.decoder.kind not in ("magvit", "shapes"):
        problems.append("policy.decoder.kind must be 'magvit' or 'shapes'")
    elif cfg.policy.decoder.kind == "magvit" and not (cfg.policy.decoder.path and Path(cfg.policy.decoder.path).is_dir()):
        problems.append(f"policy.decoder.path={cfg.policy.decoder.path!r} must be a local showlab/magvitv2 directory")
    if cfg.policy.tokenizer.kind == "hf" and not (cfg.policy.tokenizer.path and Path(cfg.policy.tokenizer.path).is_dir()):
        problems.append(f"policy.tokenizer.path={cfg.policy.tokenizer.path!r} must be a local phi-1.5 tokenizer dir")
    for key, specs in (("rewards", cfg.rewards), ("eval.rewards", cfg.eval.rewards)):
        for i, spec in enumerate(specs):
            name = spec.get("name") if isinstance(spec, (dict, DictConfig)) else None
            if not isinstance(name, str):
                problems.append(f"{key}[{i}] needs a 'name' (one of {reward_names()} or 'package.module:Factory')")
            elif name not in reward_names() and ":" not in name and "." not in name:
                problems.append(f"{key}[{i}]: unknown reward {name!r}; known rewards are {reward_names()}, or give "
                                f"an import path 'package.module:Factory'")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def to_dataclass(node: DictConfig, cls: type) -> Any:
    """A config section as its dataclass (e.g. `to_dataclass(cfg.sampler, SamplerConfig)`)."""
    obj = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
    return obj if isinstance(obj, cls) else cls(**obj)


def save_resolved(cfg: DictConfig, output_dir: str | Path) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = out / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)
    return path
