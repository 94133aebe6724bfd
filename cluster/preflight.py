"""Checks that run before any actor starts, so that a run that cannot work fails in seconds with the cause and
the fix in its last line: the output directory, the initial weights, and whether the cluster can hold the run.

`StartupError` is the error of this stage (and of an actor that fails while starting); the CLI prints its
message as the last line and exits with status 1.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
import sys
import time
import uuid
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from learner.checkpoint import MANIFEST
from policy.factory import adapters_only
from policy.family import family
from policy.files import sha256_file
from policy.hub import resolve_path
from policy.weights import CheckpointError, find_weight_files

from .config import ConfigError, plain, rollout_range, section
from .waiting import Wait


class StartupError(RuntimeError):
    """The run cannot start; the message names the cause and the fix."""


class OutputDirInUse(StartupError):
    """Another process holds the run lock of the output directory (this one must write nothing there)."""


# ----- output directory ---------------------------------------------------------------------------------------------
LOCK_NAME = ".maskgrpo.lock"
_held_locks: dict[str, Any] = {}      # resolved output_dir -> the open lock file whose flock this process holds


def prepare_output_dir(output_dir: str | Path) -> Path:
    """Create `output_dir`, take its run lock (`lock_output_dir`) before anything else is written there, and prove
    it is writable (ConfigError naming it otherwise)."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_output_dir(out)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        what = "is a file" if out.exists() and not out.is_dir() else f"is not writable ({e.strerror or e})"
        raise ConfigError(f"output_dir={str(output_dir)!r} {what}: choose a writable directory, e.g. "
                          f"output_dir=runs/my_run") from None
    return out


def lock_output_dir(output_dir: str | Path) -> None:
    """One run per output directory: an exclusive `flock` on ``output_dir/.maskgrpo.lock``, held until this
    process ends (the operating system releases it then, also after kill -9, so a killed run never blocks its own
    resume) or `release_output_dir`. The file names the holder (pid, host, start time, command); a second
    process is refused at once with a StartupError naming it. Taking it again in the holding process is a no-op."""
    key = str(Path(output_dir).resolve())
    if key in _held_locks:
        return
    path = Path(key) / LOCK_NAME
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = _describe_holder(f.read())
        f.close()
        raise OutputDirInUse(f"output_dir={str(output_dir)!r} is in use by another run ({holder}; lock file {path}): "
                           f"two runs in one directory would mix their metrics and overwrite each other's "
                           f"checkpoints. Wait for that run to end or stop it, or use another output_dir") from None
    except OSError as e:                  # a file system without locks (some network mounts): say so, go on
        f.close()
        print(f"[maskgrpo] output_dir={str(output_dir)!r}: its file system cannot lock files ({e.strerror or e}); "
              f"a second run started into it would not be detected", flush=True)
        return
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
    f.flush()
    _held_locks[key] = f


def release_output_dir(output_dir: str | Path) -> None:
    """Give up this process's run lock of `output_dir` (when it is done there but goes on living)."""
    f = _held_locks.pop(str(Path(output_dir).resolve()), None)
    if f is not None:
        f.close()                         # closing the file releases the flock


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "its holder is still starting" if not text.strip() else f"holder {text.strip()[:200]!r}"


def refuse_to_mix_runs(output_dir: str | Path, resume: Optional[str]) -> None:
    """A new run (no `resume`) into a directory that already holds a run's steps would interleave two runs'
    metrics and checkpoints (and a later resume=auto would continue the old one): refuse, naming both ways out."""
    if resume is not None:
        return
    out = Path(output_dir)
    metrics = out / "metrics.jsonl"
    lines = sum(1 for line in metrics.open(encoding="utf-8", errors="replace") if line.strip()) \
        if metrics.is_file() else 0
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    if lines or checkpoints:
        held = ", ".join(([f"{lines} metric lines"] if lines else [])
                         + ([f"checkpoints up to {checkpoints[-1]}"] if checkpoints else []))
        raise ConfigError(f"output_dir={str(output_dir)!r} already holds a run ({held}): continue it with "
                          f"resume=auto, or start a new run in another directory (output_dir=runs/<new name>)")


def config_changes(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a run's saved config.yaml and the config it resumes with (the
    keys that only steer this invocation, `resume` and `max_steps`, are left out)."""
    changes = []
    for key in sorted(set(saved) | set(new)):
        name = f"{prefix}{key}"
        if name in ("resume", "max_steps"):
            continue
        a, b = saved.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, name + ".")
        elif a != b:
            changes.append(f"{name}: {a!r} -> {b!r}")
    return changes


# ----- initial weights --------------------------------------------------------------------------------------------
def verify_policy_init(cfg: DictConfig) -> Optional[str]:
    """When `policy.init` (a path or a Hub id, resolved here: `policy.hub`) is one of our checkpoints (a directory
    with manifest.json, e.g. a training checkpoint or a pretrained base), check its weight files against the
    sha256 the manifest holds; without a manifest (a release) or for a single file, check that the weight files'
    headers read. Make `policy.arch` in the run's config what the directory's config says (that is the model that
    trains). Returns a note to print when the arch was replaced."""
    init = cfg.policy.init
    if init in ("random", "pretrained"):
        return None
    try:
        path = resolve_path(init, "policy.init")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if path.is_file():
        problem = unreadable_weights(path)
        if problem:
            raise ConfigError(f"policy.init={init!r} is not a weights file ({problem}): give a release or checkpoint "
                              f"directory (or Hub id), a .safetensors / torch.save file, 'random' or 'pretrained'")
        return None
    if not path.is_dir():
        return None
    policy = section(cfg, "policy")
    if problem := adapters_only(replace(policy, init=str(path))):
        raise ConfigError(problem.replace(repr(str(path)), repr(init)))
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise StartupError(f"policy.init={init!r}: its {MANIFEST} is unreadable ({e}); the checkpoint is "
                               f"damaged: point policy.init at another checkpoint") from None
        for rel, info in files.items():
            if not re.search(r"(model|config)[^/]*\.(safetensors|bin|json)$", rel) or rel.startswith("engine/"):
                continue                      # weights and configs only (optimizer state is not needed here)
            f = path / rel
            if not f.is_file() or f.stat().st_size != info["size"] or \
                    (info.get("sha256") and sha256_file(f) != info["sha256"]):
                raise StartupError(f"policy.init={init!r}: {rel} does not match the sha256 in its {MANIFEST} (the "
                                   f"file is corrupted or was changed): copy it again or use another checkpoint")
    else:                                 # a release directory: no checksums, but a damaged header shows at once
        weights = [path / rel for rel in family(policy.family).model_class.weight_files if (path / rel).is_file()]
        try:
            weight_files = weights or find_weight_files(path)
        except CheckpointError as e:
            raise ConfigError(f"policy.init={init!r}: {e}") from None
        for f in weight_files:
            problem = unreadable_weights(f)
            if problem:
                raise StartupError(f"policy.init={init!r}: {f.name} cannot be read ({problem}); the file is "
                                   f"truncated or damaged: copy it again") from None
    fam = family(policy.family)
    try:
        found = fam.arch_from_directory(path, policy)
    except (CheckpointError, ValueError, TypeError) as e:
        raise StartupError(f"policy.init={init!r}: its config cannot be read ({e})") from None
    notes = []
    if found is not None:
        arch, what = found
        if arch != policy.arch:
            cfg.policy.arch = OmegaConf.merge(cfg.policy.arch, asdict(arch))
            notes.append(f"policy.arch taken from {path} ({what})")
    for key, value in fam.component_paths(policy, path).items():     # e.g. Meissonic's text_encoder/ folder
        OmegaConf.update(cfg.policy, key, value, merge=False)
        notes.append(f"policy.{key}={value}")
    return "; ".join(notes) + "; config.yaml records it" if notes else None


def verify_resume_lora(cfg: DictConfig, checkpoint: str) -> None:
    """A LoRA checkpoint resumes only with its own adapter settings, a full one only without LoRA: refused here,
    before any actor starts, with the settings to use."""
    from learner.checkpoint import lora_mismatch, saved_lora
    from .config import section
    problem = lora_mismatch(saved_lora(checkpoint), section(cfg, "learner").lora, checkpoint)
    if problem:
        raise ConfigError(problem)


def unreadable_weights(f: Path) -> Optional[str]:
    """Why `f` cannot be a weights file (None when its header reads): checked before any actor starts."""
    if f.suffix == ".safetensors":
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
            return None
        except Exception as e:           # safetensors raises its own error types for a damaged header
            return f"{type(e).__name__}: {e}"
    if zipfile.is_zipfile(f):
        return None
    return "neither a safetensors file nor a torch.save archive"


# ----- cluster resources ------------------------------------------------------------------------------------------
def required_resources(cfg: DictConfig) -> dict[str, Any]:
    """The run's actors and what each asks of Ray: rollout workers, reward actors (a second pool when the
    evaluation scores with other rewards), learner ranks (kept on one node when they use GPUs)."""
    c = cfg.cluster
    reward_pools = 2 if plain(cfg.eval.rewards) and plain(cfg.eval.rewards) != plain(cfg.rewards) else 1
    roles = [("rollout workers", rollout_range(c)[1], c.rollout_gpus),      # the start; more join when resources appear
             ("reward actors", c.num_reward_actors * reward_pools, c.reward_gpus),
             ("learner ranks", c.num_learner_ranks, c.learner_gpus)]
    return {"roles": roles, "CPU": sum(n for _, n, _ in roles) * c.cpus_per_actor,
            "GPU": sum(n * g for _, n, g in roles), "actors": sum(n for _, n, _ in roles),
            "learner_node_gpu": c.num_learner_ranks * c.learner_gpus}


def resource_problems(cfg: DictConfig, total: dict[str, float], node_gpus: list[float]) -> list[str]:
    """What the cluster (`total` resources, GPUs per node) lacks for this run, with overrides that fit."""
    need, c, problems = required_resources(cfg), cfg.cluster, []
    have_cpu, have_gpu = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    if need["CPU"] > have_cpu + 1e-9:
        fit = math.floor(have_cpu / need["actors"] * 4) / 4
        listing = ", ".join(f"{n} {name}" for name, n, _ in need["roles"])
        problems.append(f"{need['CPU']:g} CPUs needed ({listing} × cluster.cpus_per_actor={c.cpus_per_actor:g}) but "
                        f"the cluster has {have_cpu:g} free: "
                        + (f"set cluster.cpus_per_actor={fit:g}" if fit > 0 else "use fewer actors")
                        + " or add nodes")
    if need["GPU"] > have_gpu + 1e-9:
        listing = ", ".join(f"{n} {name} × {g:g}" for name, n, g in need["roles"] if g)
        problems.append(f"{need['GPU']:g} GPUs needed ({listing}) but the cluster has {have_gpu:g} free: lower "
                        f"cluster.rollout_gpus / learner_gpus / reward_gpus (fractions share a GPU, see "
                        f"configs/one_gpu.yaml), use device=cpu, or add GPU nodes")
    elif need["learner_node_gpu"] > max(node_gpus, default=0.0) + 1e-9:
        problems.append(f"the {c.num_learner_ranks} learner ranks need {need['learner_node_gpu']:g} GPUs on one node "
                        f"but the largest node has {max(node_gpus, default=0.0):g}: lower cluster.num_learner_ranks")
    return problems


ROLE_KEYS = (("rollout workers", "rollout"), ("reward actors", "reward"), ("learner ranks", "learner"))


def placement_problems(cfg: DictConfig, nodes: list[dict[str, Any]]) -> list[str]:
    """What the live `nodes` ([{"labels": {...}, "available": {...}}]) lack for the roles that are placed by
    `cluster.<role>_resources` / `<role>_labels`: for each, how many of its actors fit on the nodes it may use."""
    c, problems = cfg.cluster, []
    counts = {"rollout": rollout_range(c)[1], "reward": c.num_reward_actors, "learner": c.num_learner_ranks}
    for role, key in ROLE_KEYS:
        res, labels = plain(c[f"{key}_resources"]) or {}, plain(c[f"{key}_labels"]) or {}
        if not res and not labels:
            continue
        gpus = c[f"{key}_gpus"]
        want = {"CPU": c.cpus_per_actor, **({"GPU": gpus} if gpus else {}), **res}
        match = [n for n in nodes if all(str(n["labels"].get(k)) == str(v) for k, v in labels.items())]
        fit = sum(min(math.floor(n["available"].get(k, 0.0) / v + 1e-9) for k, v in want.items()) for n in match)
        if fit < counts[key]:
            each = ", ".join(f"{v:g} {k}" for k, v in want.items())
            where = f"{len(match)} nodes labelled {labels}" if labels else f"{len(match)} nodes"
            start = " ".join(([f"--resources='{json.dumps(res)}'"] if res else []) +
                             ([f"--labels={','.join(f'{k}={v}' for k, v in labels.items())}"] if labels else []))
            problems.append(f"{counts[key]} {role} need {each} each (cluster.{key}_resources / {key}_labels) but the "
                            f"{where} have free room for {fit}: start nodes with `ray start {start}`, or change "
                            f"cluster.{key}_resources / cluster.{key}_labels")
    return problems


def check_cluster_resources(cfg: DictConfig, wait_s: float, read: Optional[Callable[[], tuple]] = None,
                            poll_s: float = 2.0) -> None:
    """Fail (StartupError) when the cluster's free resources cannot hold the run's actors, instead of leaving them
    pending forever: in all (CPUs, GPUs) and, for roles placed by resources or labels, on the nodes they may use.
    Nodes that an autoscaler adds late (or resources other jobs release) are waited for up to `wait_s` seconds.
    `read()` returns (free resources, GPUs per node[, nodes as `placement_problems` takes them])."""
    read = read or _ray_resources
    problems: list[str] = []

    def too_small(elapsed: float) -> StartupError:
        return StartupError(f"the Ray cluster is too small for this config (waited {wait_s:g} s for more nodes, "
                            f"cluster.resource_wait_s):\n  - " + "\n  - ".join(problems))
    for timeout in Wait("nodes with room for the run", poll_s, wait_s, expired=too_small, say_every_s=60.0).polls():
        total, node_gpus, *rest = read()
        problems = resource_problems(cfg, total, node_gpus) + (placement_problems(cfg, rest[0]) if rest else [])
        if not problems:
            return
        time.sleep(timeout)


def check_local_resources(cfg: DictConfig) -> None:
    """In local mode (a private Ray instance on this machine) the GPUs are known before anything starts: fail
    at once when the config asks for more than this machine has (before pretraining a base, say)."""
    gpus = float(torch.cuda.device_count())
    problems = resource_problems(cfg, {"CPU": math.inf, "GPU": gpus}, [gpus])
    if not problems:
        gpu_bytes = float(torch.cuda.mem_get_info(0)[1]) if gpus else 0.0
        problems = memory_problems(cfg, available_memory_bytes(), gpu_bytes)
    if problems:
        raise StartupError("this machine cannot hold the run (local mode: no cluster.address):\n  - "
                           + "\n  - ".join(problems))


def rollout_bytes_per_sample(cfg: DictConfig) -> int:
    """An estimate, from below, of the memory one rollout sample needs while a worker samples it: its trajectory
    record and one forward pass, twice with guidance on (the family's estimate: `PolicyFamily.rollout_bytes_per_sample`)."""
    policy, sampler = section(cfg, "policy"), section(cfg, "sampler")
    fam = family(policy.family)
    guided = fam.model_class.guidance_weight(sampler.guidance_scale) != 0.0
    return fam.rollout_bytes_per_sample(policy.arch, int(sampler.steps), guided)


def memory_problems(cfg: DictConfig, cpu_bytes: float, gpu_bytes: float) -> list[str]:
    """Group sizes and batches that cannot fit this machine (local mode): the rollout workers sample
    data.prompts_per_step x data.group_size samples a step, each worker its share in one batch (on the CPU all of
    them in this machine's memory, on a GPU each worker within its cluster.rollout_gpus share)."""
    c, d = cfg.cluster, cfg.data
    per_worker = math.ceil(d.prompts_per_step / c.num_rollout_workers) * d.group_size
    per_sample = rollout_bytes_per_sample(cfg)
    if c.rollout_gpus > 0:
        need, have, where = per_worker * per_sample, gpu_bytes * min(1.0, float(c.rollout_gpus)), \
            f"a rollout worker's GPU share (cluster.rollout_gpus={c.rollout_gpus:g})"
    else:
        need, have, where = d.prompts_per_step * d.group_size * per_sample, cpu_bytes, "this machine's free memory"
    if need <= have:
        return []
    return [f"data.group_size={d.group_size} x data.prompts_per_step={d.prompts_per_step} rollouts need at least "
            f"{need / 2**30:.1f} GiB (trajectories and one forward pass; {per_sample / 2**20:.2f} MiB a sample) but "
            f"{where} is {have / 2**30:.1f} GiB: lower data.group_size or data.prompts_per_step, or add rollout "
            f"workers (cluster.num_rollout_workers) / a larger GPU"]


def available_memory_bytes() -> float:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping); inf where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def check_prompt_lengths(cfg: DictConfig) -> Optional[str]:
    """A note naming the prompts longer than the model reads (its text area or text encoder's length), which are
    cut: the policy never sees their ends. None when every prompt fits."""
    from .data import eval_prompts, train_prompts
    policy = section(cfg, "policy")
    fam = family(policy.family)
    notes = []
    for which, items in (("training", train_prompts(cfg)), ("evaluation", eval_prompts(cfg))):
        counts, limit, what = fam.prompt_token_counts(policy, [it.prompt for it in items])
        long = [(i, n) for i, n in enumerate(counts) if n > limit]
        if long:
            i, n = max(long, key=lambda x: x[1])
            text = items[i].prompt
            notes.append(f"{len(long)} of {len(items)} {which} prompts are longer than {what} and are cut to it "
                         f"(the longest, prompt {i + 1}, "
                         f"{text[:60]!r}{'...' if len(text) > 60 else ''}, has {n} tokens)")
    if not notes:
        return None
    return "; ".join(notes) + ": shorten them, or use a model trained with a longer text length"


def _ray_resources() -> tuple[dict[str, float], list[float], list[dict[str, Any]]]:
    """What is free now (other jobs' actors hold the rest; counting the total let a second job start and hang
    with its actors pending forever), each live node's GPUs, and each live node's labels and free resources."""
    import ray
    from ray._private import state         # per-node free resources (the public state API needs the dashboard)
    live = [n for n in ray.nodes() if n.get("Alive")]
    node_gpus = [float(n.get("Resources", {}).get("GPU", 0.0)) for n in live]
    free = state.available_resources_per_node()
    nodes = [{"labels": n.get("Labels") or {}, "available": free.get(n["NodeID"], {})} for n in live]
    return ray.available_resources(), node_gpus, nodes


# ----- errors from actors -------------------------------------------------------------------------------------
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")


def root_cause(err: BaseException) -> str:
    """The original exception behind a Ray error (an actor's failed __init__ or task), as 'Type: message'."""
    seen = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException) and not type(inner).__module__.startswith("ray"):
            return f"{type(inner).__name__}: {inner}".splitlines()[0]
        e = inner if isinstance(inner, BaseException) else None
    found = [m for line in str(err).splitlines() if (m := _ERROR_LINE.match(line.strip()))]
    found = [m for m in found if not m.group(1).startswith("ray.")] or found
    if found:
        kind, message = found[-1].group(1), found[-1].group(2)
        return f"{kind.rsplit('.', 1)[-1]}: {message}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
