"""The run configuration: OmegaConf YAML + `key=value` overrides over a typed schema of dataclasses.

The schema itself rejects bad values: unknown keys and wrong types fail in OmegaConf (Enum fields accept only
their members), and each section's dataclass checks its own ranges in `__post_init__`, which runs when the
merged config is turned into objects (`OmegaConf.to_object`). `RunConfig.__post_init__` adds the checks that
span sections or touch the disk (paths, prompt files), listing every problem at once. All of this happens in
`load_config`, before any actor starts, and the message names the key and the fix.

A section becomes its dataclass with `section(cfg, "learner")` (one way, used for every actor's arguments);
free-form parts (reward specs) become plain containers with `plain`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from algorithm.config import AlgorithmConfig, legacy_key_problem
from learner.config import LearnerConfig
from policy.factory import PolicyConfig
from policy.family import family
from policy.files import atomic_write_text
from policy.hub import is_hub_id
from policy.sampler import SamplerConfig
from rewards.base import reward_class, reward_names

from .prompts import PromptFileError, read_prompts


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and how to fix it."""


class Device(StrEnum):
    auto = "auto"       # each role on CUDA iff it is given GPUs (cluster.*_gpus); single-process commands: cuda if any
    cpu = "cpu"
    cuda = "cuda"


class Backend(StrEnum):
    ray = "ray"         # every role in its own Ray actor(s): placement, restarts, the object store
    local = "local"     # every role in the driver's process, Ray not imported (debugging, profilers, pytest)


def rollout_range(c: Any) -> tuple[int, int, int]:
    """(min, start, max) rollout workers of a cluster section. The run goes on while `min` are alive
    (min_rollout_workers, default 1: a fixed fleet that loses a node carries on with the workers left), starts
    once `start` are ready (num_rollout_workers, within the range) and grows to `max` (max_rollout_workers,
    default num_rollout_workers) when resources appear."""
    lo = c.min_rollout_workers if c.min_rollout_workers is not None else 1
    hi = c.max_rollout_workers if c.max_rollout_workers is not None else max(c.num_rollout_workers, lo)
    return lo, min(max(c.num_rollout_workers, lo), hi), hi


def role_device(gpus: float) -> str:
    """Where a role runs: on CUDA iff it is given a GPU share (cluster.rollout_gpus / reward_gpus / learner_gpus;
    `device: cpu|cuda` only checks that these agree, see RunConfig)."""
    return "cuda" if gpus > 0 else "cpu"


class WeightSync(StrEnum):
    collective = "collective"       # NCCL (GPUs) / gloo (CPU) broadcast group
    object_store = "object_store"   # buckets through Ray's object store


class WorldSplit(StrEnum):
    """Which shapes-world prompts are held out (`worlds.shapes.world.make_splits`)."""
    stratified = "stratified"           # heldout_fraction of every tag's prompts, seeded
    count_transfer = "count_transfer"   # the same, except counting: one (number, shape) pair per number word,
                                        # distinct shapes, every number word trained with >= 3 shapes (>= 4 shapes)


class PromptSampling(StrEnum):
    uniform = "uniform"   # epochs over all training prompts: each tag trained in proportion to its prompts
    by_tag = "by_tag"     # every GenEval tag equally often (cluster.data.PromptSchedule)


@dataclass
class DataConfig:
    train_prompts: Optional[str] = None   # .txt (one prompt a line), .jsonl (GenEval metadata or {"prompt": ...}),
                                          # .parquet (a `prompt` column); None: the shapes world's train split
    eval_prompts: Optional[str] = None    # GenEval metadata .jsonl; None: the shapes world's held-out split
    prompts_per_step: int = 4             # prompts (GRPO groups) per training step
    group_size: int = 6                   # G samples per prompt
    eval_max_prompts: int = 0             # 0: all evaluation prompts
    prompt_sampling: PromptSampling = PromptSampling.uniform   # by_tag: every tag equally often (docs/rewards.md)
    tag_weights: dict[str, int] = field(default_factory=dict)  # by_tag: draws of a tag per tag epoch (unnamed: 1)

    def __post_init__(self) -> None:
        _require([(self.group_size >= 2, "data.group_size must be >= 2 (GRPO normalises rewards within a group)"),
                  (self.prompts_per_step >= 1, "data.prompts_per_step must be >= 1"),
                  (self.eval_max_prompts >= 0, "data.eval_max_prompts must be >= 0"),
                  # the sign here; whether any tag is drawn at all depends on the prompts (PromptSchedule checks it)
                  (all(w >= 0 for w in self.tag_weights.values()),
                   f"data.tag_weights must be integers >= 0, got {dict(self.tag_weights)}"),
                  (not self.tag_weights or self.prompt_sampling == PromptSampling.by_tag,
                   "data.tag_weights weighs the tags of data.prompt_sampling=by_tag: set that too, or drop it")])


@dataclass
class ClusterConfig:
    backend: Backend = Backend.ray        # local: one process, no Ray (one learner rank)
    address: Optional[str] = None         # Ray address; None: start a local Ray instance (single-node mode)
    num_rollout_workers: int = 1          # the fleet's size at the start (and its maximum unless max_ is set)
    min_rollout_workers: Optional[int] = None   # the run goes on while this many are alive (None: 1)
    max_rollout_workers: Optional[int] = None   # more workers start (up to this) whenever resources appear
    num_reward_actors: int = 1
    num_learner_ranks: int = 1
    rollout_gpus: float = 0.0             # GPUs per rollout worker (fractions allowed); > 0: the worker runs on CUDA
    reward_gpus: float = 0.0              # GPUs per reward actor; > 0: rewards run on CUDA
    learner_gpus: float = 0.0             # GPUs per learner rank (1 on a GPU cluster); > 0: the learner runs on CUDA
    cpus_per_actor: float = 1.0
    # Placement per role: custom Ray resources each actor asks for ({name: amount}; `ray start
    # --resources='{"rollout": 8}'`) and node labels it must land on ({key: value}; `ray start --labels=role=rollout`)
    rollout_resources: dict[str, float] = field(default_factory=dict)
    reward_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)
    rollout_labels: dict[str, str] = field(default_factory=dict)
    reward_labels: dict[str, str] = field(default_factory=dict)
    learner_labels: dict[str, str] = field(default_factory=dict)
    max_staleness: int = 0                # 0: synchronous (the paper); n: workers may run n versions ahead
    weight_sync: WeightSync = WeightSync.collective
    weight_bucket_mb: int = 64
    max_restarts: int = 2
    local_num_cpus: Optional[int] = None  # CPUs given to a local Ray instance
    resource_wait_s: float = 60.0         # how long to wait for nodes (an autoscaler's) before "cluster too small"
    cluster_lost_s: float = 60.0          # the driver exits once its Ray cluster has been unreachable this long
    actor_start_s: float = 900.0          # every actor must have built its model within this (else: StartupError)
    learner_restarts: int = 0             # a dead learner rank: rebuild the learner from the last checkpoint n times
    poll_s: float = 2.0                   # while waiting for anything, the driver checks every poll_s that the
                                          # learner ranks are alive (a dead rank is noticed within ~poll_s)
    rollout_wait_s: float = 600.0         # with fewer than min_rollout_workers alive, wait this long for new ones
    learner_wait_s: float = 600.0         # a learner restart waits this long for its resources (a node back)
    reward_restart_s: float = 120.0       # a failed reward call waits this long for its actor's restart
    sync_timeout_s: float = 900.0         # one weight hand-over (a transfer, forming the broadcast group)

    def __post_init__(self) -> None:
        _require([(getattr(self, k) >= 1, f"cluster.{k} must be >= 1")
                  for k in ("num_rollout_workers", "num_reward_actors", "num_learner_ranks")] +
                 [(getattr(self, k) >= 0, f"cluster.{k} must be >= 0")
                  for k in ("rollout_gpus", "reward_gpus", "learner_gpus", "max_staleness", "max_restarts")] +
                 [(self.cpus_per_actor > 0, "cluster.cpus_per_actor must be > 0"),
                  (self.resource_wait_s >= 0 and self.cluster_lost_s > 0 and self.actor_start_s > 0,
                   "cluster.resource_wait_s must be >= 0, cluster.cluster_lost_s and actor_start_s > 0"),
                  (self.weight_bucket_mb >= 1, "cluster.weight_bucket_mb must be >= 1"),
                  (1 <= rollout_range(self)[0] <= rollout_range(self)[2],
                   f"cluster.min_rollout_workers={self.min_rollout_workers} and max_rollout_workers="
                   f"{self.max_rollout_workers} must satisfy 1 <= min <= max (or leave them unset: "
                   f"num_rollout_workers={self.num_rollout_workers} for both)"),
                  (self.learner_restarts >= 0, "cluster.learner_restarts must be >= 0"),
                  (min(self.poll_s, self.rollout_wait_s, self.learner_wait_s, self.reward_restart_s,
                       self.sync_timeout_s) > 0,
                   "cluster.poll_s, rollout_wait_s, learner_wait_s, reward_restart_s and sync_timeout_s must be > 0"),
                  (all(v > 0 for k in ("rollout", "reward", "learner") for v in getattr(self, f"{k}_resources").values()),
                   "cluster.*_resources amounts must be > 0 (e.g. cluster.rollout_resources={rollout: 1})"),
                  (self.backend == Backend.ray or not any(getattr(self, f"{k}_{w}") for k in ("rollout", "reward",
                   "learner") for w in ("resources", "labels")),
                   "cluster.*_resources / *_labels place actors on Ray nodes: remove them, or use cluster.backend=ray"),
                  (self.backend == Backend.ray or self.num_learner_ranks == 1,
                   "cluster.backend=local runs one learner rank in the driver's process: set "
                   "cluster.num_learner_ranks=1, or use cluster.backend=ray for a DeepSpeed world of several ranks"),
                  (self.backend == Backend.ray or self.address is None,
                   "cluster.backend=local starts no Ray: remove cluster.address, or use cluster.backend=ray")])


@dataclass
class PretrainConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    caption_noise: float = 0.3            # fraction of scenes paired with another prompt of the same category
    output: Optional[str] = None          # where the base checkpoint goes (default: <output_dir>/base)

    def __post_init__(self) -> None:
        _require([(self.steps >= 1 and self.batch_size >= 1, "pretrain.steps and pretrain.batch_size must be >= 1"),
                  (0.0 <= self.caption_noise <= 1.0, "pretrain.caption_noise must lie in [0, 1]")])


@dataclass
class WorldConfig:
    """The shapes world (`worlds.shapes`): the synthetic GenEval-shaped world of the default runs, whose prompts
    are the training and held-out sets when `data.*_prompts` are unset, whose exact decoder is
    `policy.decoder.kind: shapes` and whose detector is the `shapes` reward detector. The first fields are
    `worlds.shapes.world.ShapesWorld`'s; the split fields say which prompts are held out."""
    image_size: int = 32
    grid_size: int = 8
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    background: list[int] = field(default_factory=lambda: [0, 0, 0])
    relations: list[str] = field(default_factory=lambda: ["left of", "right of", "above", "below"])
    counts: list[int] = field(default_factory=lambda: [2, 3, 4])
    heldout_fraction: float = 0.25        # of each GenEval tag's prompts (worlds.shapes.world.make_splits)
    split_seed: int = 0
    split: WorldSplit = WorldSplit.stratified

    def __post_init__(self) -> None:
        try:
            world = self.shapes_world()
            if self.split == WorldSplit.count_transfer:
                from worlds.shapes.world import count_transfer_pairs
                count_transfer_pairs(world, self.split_seed)
        except ValueError as e:
            raise ValueError(f"world: {e}") from None
        _require([(0.0 <= self.heldout_fraction < 1.0, "world.heldout_fraction must lie in [0, 1)")])

    def split_kwargs(self) -> dict[str, Any]:
        """`make_splits` keyword arguments besides the world (which prompts are held out)."""
        return {"heldout_fraction": float(self.heldout_fraction), "seed": int(self.split_seed),
                "split": str(self.split)}

    def kwargs(self) -> dict[str, Any]:
        """`ShapesWorld` keyword arguments (what the decoder, detector and renderer are built from)."""
        return {k: getattr(self, k) for k in ("image_size", "grid_size", "shapes", "colors", "background",
                                               "relations", "counts")}

    def shapes_world(self):
        from worlds.shapes.world import ShapesWorld
        return ShapesWorld(**self.kwargs())


@dataclass
class EvalConfig:
    at_start: bool = True
    every: int = 0                        # also every N steps (0: only at step 0 and at the last step)
    samples_per_prompt: int = 1
    guidance_scale: float = 0.0
    rewards: list[dict[str, Any]] = field(default_factory=list)   # empty: the training rewards

    def __post_init__(self) -> None:
        _require([(self.every >= 0, "eval.every must be >= 0"),
                  (self.samples_per_prompt >= 1, "eval.samples_per_prompt must be >= 1")])


@dataclass
class LoggingConfig:
    sample_every: int = 0                 # image grid every N steps (0: first and last step only)
    tensorboard: bool = False
    wandb_project: Optional[str] = None
    progress: bool = True


@dataclass
class RewardServerConfig:
    """`maskgrpo serve-reward` (rewards/server.py, docs/reward_server.md, "Limits"); the token is never in a config."""
    host: str = "127.0.0.1"               # loopback unless told otherwise (e.g. 0.0.0.0 behind a firewall)
    port: int = 8377
    max_batch: int = 64                   # images per model batch: concurrent requests merged, larger ones split
    max_wait_ms: float = 5.0              # how long a request waits for others to join its batch
    max_body_mb: float = 256.0            # larger request bodies get 413
    max_request_images: int = 1024        # more images in one request get 413
    cache_size: int = 1024                # recent answers kept by idempotency key (a retried request is not rescored)
    cache_mb: float = 64.0                # ... and at most this many MiB of them
    max_inflight: int = 64                # /score requests at once (reading, decoding, queued, scoring); beyond: 429
    max_inflight_mb: float = 1024.0       # their bodies' MiB at once; beyond: 429
    body_timeout_s: float = 60.0          # a body must arrive within this (else 408)
    header_timeout_s: float = 10.0        # a request's line and headers within this (else the connection is closed)
    keep_alive_s: float = 5.0             # idle keep-alive connections are closed after this
    max_connections: int = 256            # open connections at once (uvicorn limit_concurrency); beyond: 503
    device: Optional[str] = None          # given to every reward spec that sets none (None: their defaults)

    def __post_init__(self) -> None:
        _require([(0 <= self.port <= 65535, "reward_server.port must be in 0..65535"),
                  (self.max_batch >= 1 and self.cache_size >= 1, "reward_server.max_batch and cache_size must be >= 1"),
                  (self.max_wait_ms >= 0 and self.max_body_mb > 0,
                   "reward_server.max_wait_ms must be >= 0 and max_body_mb > 0"),
                  (self.max_request_images >= 1 and self.max_inflight >= 1 and self.cache_mb >= 0,
                   "reward_server.max_request_images and max_inflight must be >= 1, cache_mb >= 0"),
                  (self.max_inflight_mb >= self.max_body_mb,
                   "reward_server.max_inflight_mb must be >= max_body_mb (one largest request must fit)"),
                  (self.body_timeout_s > 0 and self.header_timeout_s > 0 and self.keep_alive_s > 0,
                   "reward_server.body_timeout_s, header_timeout_s and keep_alive_s must be > 0"),
                  (self.max_connections > self.max_inflight,
                   "reward_server.max_connections must be > max_inflight (room for /health and queued clients)")])


def _default_rewards() -> list[dict[str, Any]]:
    return [{"name": "geneval", "weight": 1.0, "detector": {"name": "shapes"}}]


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 20
    resume: Optional[str] = None          # "auto": the last good checkpoint of output_dir; or a checkpoint path
    device: Device = Device.auto          # see Device; where each role runs follows cluster.*_gpus
    save_every: int = 0                   # checkpoint every N steps (0: at the end only)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rewards: list[dict[str, Any]] = field(default_factory=_default_rewards)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reward_server: RewardServerConfig = field(default_factory=RewardServerConfig)
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self) -> None:
        """The checks that span sections or read the disk; every problem is listed at once."""
        c, problems = self.cluster, []
        if self.max_steps < 0:
            problems.append("max_steps must be >= 0")
        if self.save_every < 0:
            problems.append("save_every must be >= 0")
        if self.data.prompts_per_step % c.num_learner_ranks:
            problems.append("data.prompts_per_step must be a multiple of cluster.num_learner_ranks (each rank trains "
                            "on whole groups)")
        gpus = {k: getattr(c, k) for k in ("rollout_gpus", "learner_gpus", "reward_gpus")}
        if self.device == Device.cpu and any(gpus.values()):
            problems.append(f"device=cpu but {', '.join(f'cluster.{k}={v:g}' for k, v in gpus.items() if v)}: "
                            f"set those to 0, or device=cuda / auto")
        if self.device == Device.cuda and not (c.rollout_gpus > 0 and c.learner_gpus > 0):
            problems.append("device=cuda puts rollout workers and learner ranks on GPUs: give them a share with "
                            "cluster.rollout_gpus and cluster.learner_gpus (e.g. 1, or fractions such as 0.5 to "
                            "share one GPU)")
        if self.resume not in (None, "auto") and not Path(self.resume).exists():
            problems.append(f"resume={self.resume!r}: no such checkpoint (use resume=auto or a "
                            f"checkpoints/step_N path)")
        for key, rewards in (("train_prompts", self.rewards), ("eval_prompts", self.eval.rewards or self.rewards)):
            value = getattr(self.data, key)
            if value is None:
                continue
            if not Path(value).is_file():
                problems.append(f"data.{key}={value!r} does not exist")
                continue
            try:                               # read now: a malformed file fails here, not after the actors start
                items = read_prompts(value)
            except PromptFileError as e:
                problems.append(f"data.{key}: {e}")
                continue
            for spec in rewards:            # each reward says what it needs of the prompts (GenEval: its clauses)
                problem = isinstance(spec, dict) and reward_class(spec).prompt_problem(
                    [it.prompt for it in items], [it.metadata for it in items])
                if problem:
                    problems.append(f"data.{key}={value!r}: {problem}")
        problems += _policy_problems(self.policy, self.learner.lora)
        tree = self.algorithm.tree_spec
        if tree is not None:
            try:
                tree.check(self.sampler.steps, self.data.group_size)
            except ValueError as e:
                problems.append(f"algorithm.tree: {e}")
        for key, specs in (("rewards", self.rewards), ("eval.rewards", self.eval.rewards)):
            problems += _reward_problems(key, specs, self.cluster.backend)
        _require([(False, p) for p in problems])


def _policy_problems(p: PolicyConfig, lora: Any) -> list[str]:
    """The policy section's paths (a local path or a Hub id, resolved when the model loads), the family's own
    checks, and the LoRA targets against the family's layers."""
    problems = []
    if p.init not in ("random", "pretrained") and not Path(p.init).expanduser().exists() and not is_hub_id(p.init):
        problems.append(f"policy.init={p.init!r} does not exist: give 'random', 'pretrained' (the shapes-world "
                        f"base, pretrained on first use), the local path of a release / checkpoint, or a Hub id "
                        f"(e.g. showlab/show-o-512x512, MeissonFlow/Meissonic)")
    fam = family(p.family)
    problems += fam.config_problems(p)
    model = fam.model_class
    if lora.enabled and (problem := lora.target_problem(fam.name, model.lora_targets, model.lora_note)):
        problems.append(problem)
    return problems


def _reward_problems(key: str, specs: list[dict[str, Any]], backend: "Backend") -> list[str]:
    problems = []
    for i, spec in enumerate(specs):
        name = spec.get("name") if isinstance(spec, dict) else None
        env = spec.get("runtime_env") if isinstance(spec, dict) else None
        if env is not None and not isinstance(env, dict):
            problems.append(f"{key}[{i}].runtime_env must be a mapping (Ray's runtime_env: pip, conda, env_vars, "
                            f"py_modules, working_dir), not {env!r}")
        elif env and backend != Backend.ray:
            problems.append(f"{key}[{i}].runtime_env: only Ray can start a reward in its own environment: set "
                            f"cluster.backend=ray, or remove runtime_env and install the reward's packages here")
        elif env:
            paths = ([env["working_dir"]] if env.get("working_dir") else []) + list(env.get("py_modules") or [])
            local = [p for p in paths if isinstance(p, str) and "://" not in p]
            if local:
                problems.append(f"{key}[{i}].runtime_env: py_modules / working_dir {local} is a local path, which "
                                f"Ray uploads only for a whole job: give a package URI instead, a zip with one "
                                f"top-level folder holding the modules (file:///shared/fs/pkg.zip on a shared "
                                f"filesystem, or s3:// gs:// https://), or install it with pip / conda")
        if not isinstance(name, str):
            problems.append(f"{key}[{i}] needs a 'name' (one of {reward_names()} or 'package.module:Factory')")
        elif name not in reward_names() and ":" not in name and "." not in name:
            problems.append(f"{key}[{i}]: unknown reward {name!r}; known rewards are {reward_names()}, or give "
                            f"an import path 'package.module:Factory'")
    return problems


def _require(checks: Sequence[tuple[bool, str]]) -> None:
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ValueError("\n  - ".join(problems))


def schema() -> DictConfig:
    base = OmegaConf.structured(RunConfig)
    # policy.arch is the family's (`policy.family`): a plain mapping here, read into that family's dataclass (and
    # checked there, keys and types) when the policy section is built; empty = the family's defaults
    base.policy.arch = {}
    for free_form in (base.policy.arch, base.learner.extra_deepspeed):  # not schema:
        OmegaConf.set_struct(free_form, False)   # the family's arch and keyword dicts, checked where they are read
    return base


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema ← YAML file ← `key=value` overrides, validated. Raises ConfigError with the key at fault."""
    cfg = schema()
    try:
        for layer in _config_files(path):
            _refuse_moved_keys(layer)
            cfg = OmegaConf.merge(cfg, layer)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        if overrides:
            dotlist = OmegaConf.from_dotlist(list(overrides))
            _refuse_moved_keys(dotlist)
            cfg = OmegaConf.merge(cfg, dotlist)
        OmegaConf.to_object(cfg)             # runs every section's checks (see the module docstring)
        _name_lora_targets(cfg)
        _name_world_words(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        what = str(getattr(e, "msg", None) or e).splitlines()[0]     # without OmegaConf's full_key/type lines
        raise ConfigError(f"invalid config{f' at {key!r}' if key else ''}: {what} (the keys, types and allowed "
                          f"values are the dataclasses in cluster/config.py)") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid config:\n  - {e}") from None
    return cfg


def _refuse_moved_keys(layer: Any) -> None:
    """The algorithm's keys left the learner section: name where each went (not just 'unknown key')."""
    learner = layer.get("learner") if isinstance(layer, DictConfig) else None
    if isinstance(learner, DictConfig):
        problem = legacy_key_problem(list(learner.keys()))
        if problem:
            raise ConfigError(f"invalid config: {problem}")


def _name_world_words(cfg: DictConfig) -> None:
    """A word-level tokenizer without words reads the words of the run's world: named in the config, so that
    config.yaml records the vocabulary its checkpoints were trained with."""
    if cfg.policy.tokenizer.kind == "words" and not cfg.policy.tokenizer.words:
        from worlds.shapes.world import world_words
        cfg.policy.tokenizer.words = world_words(world_kwargs(cfg))


def world_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The run's shapes world as `ShapesWorld` keyword arguments (`world` section)."""
    return section(cfg, "world").kwargs()


def _name_lora_targets(cfg: DictConfig) -> None:
    """`learner.lora.target_modules` left empty means every layer the policy family adapts: named in the config,
    so that config.yaml, the checkpoints' adapter settings and a resume all say the same list."""
    if cfg.learner.lora.rank > 0 and not cfg.learner.lora.target_modules:
        cfg.learner.lora.target_modules = list(family(cfg.policy.family).model_class.lora_targets)


def _config_files(path: str | Path | None, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The YAML layers of a config file, base first: a file may name another as ``base:`` (relative to itself),
    whose values it overrides (e.g. configs/one_gpu.yaml is the default run placed on one GPU)."""
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found (see configs/ for examples)")
    if p.resolve() in seen:
        raise ConfigError(f"config file {str(p)!r} names itself as a base (through {[str(s) for s in seen]})")
    try:
        loaded = OmegaConf.load(p)
    except Exception as e:  # yaml syntax errors
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[-1]
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {problem}; fix the file there "
                          f"(an unclosed bracket or quote, or a tab in the indentation, is the usual cause)") from None
    if isinstance(loaded, DictConfig) and "variants" in loaded:
        raise ConfigError(f"{str(p)!r} lists ablation variants for `python -m benchmarks.ablations --config {p}`; "
                          f"it is not a run config: train with its base ({loaded.get('base')}) and overrides")
    base = loaded.pop("base", None) if isinstance(loaded, DictConfig) else None
    layers = _config_files(p.parent / str(base), seen + (p.resolve(),)) if base is not None else []
    return layers + [loaded]


def section(cfg: DictConfig, key: str) -> Any:
    """A config section as its dataclass (with nested dataclasses), e.g. `section(cfg, "learner")`."""
    return OmegaConf.to_object(cfg[key])


def plain(node: Any) -> Any:
    """A config node as plain Python containers (enums as their string values); other values pass through."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def reward_specs(cfg: DictConfig, specs: Any) -> list[dict[str, Any]]:
    """Reward specs with the shapes-world detector bound to the run's world (grid, colours, shapes): what the
    reward actors and `maskgrpo serve-reward` build."""
    out = []
    for spec in plain(specs):
        spec = dict(spec)
        det = spec.get("detector")
        if isinstance(det, dict) and det.get("name") == "shapes" and len(det) == 1:
            spec["detector"] = {"name": "shapes", **world_kwargs(cfg)}
        out.append(spec)
    return out


def save_resolved(cfg: DictConfig, output_dir: str | Path) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
