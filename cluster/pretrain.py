"""`maskgrpo pretrain`: a base policy for the shapes world (any family), trained with the masked-token objective
of Show-o and Meissonic.

Each example is a train-split prompt and a scene rendered for it (tokenized exactly by the world's codebook); a
random fraction of the image tokens (cosine-schedule mask ratio, as Show-o) is replaced by the mask token and
the model predicts them (cross-entropy over the codebook). The text is dropped 10% of the time (classifier-free
guidance, as Show-o). `pretrain.caption_noise` pairs a fraction of the scenes with another prompt of the same
category — like imperfect web captions — so the base is clearly imperfect, as Show-o is on GenEval.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from learner.engine import WarmupCosine
from policy.factory import load_policy
from policy.family import family, select_rows, where_rows
from policy.files import atomic_write_json, file_manifest
from rewards.geneval import item_from_metadata
from worlds.shapes.render import ShapesRenderer

from .config import ConfigError, section
from .config import world_kwargs
from .data import train_prompts
from .runtime import seed_everything


def base_dir(cfg: DictConfig) -> Path:
    return Path(cfg.pretrain.output) if cfg.pretrain.output else Path(cfg.output_dir) / "base"


def ensure_base_policy(cfg: DictConfig) -> None:
    """`policy.init: pretrained` → the base checkpoint, pretraining it first when it does not exist yet. A base
    that exists must have been pretrained for this run's world, split and architecture (`base_mismatch`)."""
    if cfg.policy.init != "pretrained":
        return
    target = base_dir(cfg)
    if not (target / "manifest.json").is_file():
        print(f"[maskgrpo] no base policy at {target}: pretraining it ({cfg.pretrain.steps} steps)", flush=True)
        pretrain(cfg)
    elif problem := base_mismatch(cfg, target):
        raise ConfigError(problem)
    cfg.policy.init = str(target)


def world_record(cfg: DictConfig) -> dict:
    """The world and split a base is pretrained on (its training prompts), as pretrain.json records them."""
    w = section(cfg, "world")
    return {**w.kwargs(), **w.split_kwargs()}


def base_mismatch(cfg: DictConfig, target: Path) -> str | None:
    """Why the cached base at `target` is not this run's (None when it is): pretrain.json records another world or
    split (its training prompts would differ, held-out ones among them), or, for a base written before the record,
    its architecture (e.g. the codebook size) is not `policy.arch`. Otherwise the checkpoint's architecture would
    silently replace the config's and its word ids would not be this world's."""
    fix = (f"give the run another output_dir (or pretrain.output) to pretrain a base for this config, or delete "
           f"{target} (configs/default.yaml moved to the four-shape world in issue 30; the three-shape world is "
           f"world.shapes=[circle,square,triangle] world.split=stratified with its codebook, docs/experiments.md)")
    try:
        recorded = json.loads((target / "pretrain.json").read_text()).get("world")
    except (OSError, ValueError):
        recorded = None
    if recorded is not None:
        wanted = world_record(cfg)
        diff = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        if diff:
            return (f"the base policy at {target} was pretrained for another shapes world ("
                    + "; ".join(f"world.{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} here" for k in diff)
                    + f"): {fix}")
        return None
    policy = section(cfg, "policy")
    found = family(policy.family).arch_from_directory(target, policy)
    if found is not None and found[0] != policy.arch:
        return f"the base policy at {target} was pretrained with another policy.arch than this config's: {fix}"
    return None


def pretrain(cfg: DictConfig) -> Path:
    p = cfg.pretrain
    seed_everything(cfg.seed)
    policy_cfg = section(cfg, "policy")
    policy_cfg.init = "random"
    policy = load_policy(policy_cfg, "cpu", with_decoder=False)
    model = policy.model.train()
    renderer = ShapesRenderer(**world_kwargs(cfg))
    if renderer.codebook.codebook_size > model.codebook_size:
        raise ValueError(f"the shapes world needs {renderer.codebook.codebook_size} codes but the policy's "
                         f"codebook has {model.codebook_size}")
    items = train_prompts(cfg)
    geneval_items = [item_from_metadata(it.prompt, it.metadata) for it in items]
    with torch.no_grad():
        text = policy.condition([it.prompt for it in items])
        empty = policy.null_condition()
    num_steps = cfg.sampler.steps
    by_tag: dict[str, list[int]] = {}
    for i, it in enumerate(geneval_items):
        by_tag.setdefault(it.tag, []).append(i)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(p.warmup_steps, p.steps, overlap=True))
    t0, losses = time.perf_counter(), []
    for step in range(p.steps):
        idx = rng.integers(0, len(items), p.batch_size)
        scene_idx = idx.copy()
        noisy = rng.random(p.batch_size) < p.caption_noise
        for j in np.nonzero(noisy)[0]:
            scene_idx[j] = rng.choice(by_tag[geneval_items[idx[j]].tag])
        codes = torch.from_numpy(renderer.sample_codes([geneval_items[i] for i in scene_idx], rng))
        # the share of the schedule done, u: mask ratio cos(u·π/2) as at the start of sampler step u·T
        u = torch.from_numpy(rng.random(p.batch_size)).float()
        ratio = torch.cos(u * math.pi / 2).clamp(min=1.0 / codes.shape[1])
        masked = torch.from_numpy(rng.random(codes.shape)).float() < ratio[:, None]
        masked[torch.arange(p.batch_size), torch.from_numpy(rng.integers(0, codes.shape[1], p.batch_size))] = True
        cond = select_rows(text, torch.from_numpy(idx))
        drop = torch.from_numpy(rng.random(p.batch_size) < 0.1)
        cond = where_rows(drop, empty, cond)
        context = model.context([(cond, 1)], inference=False, reuse=False)
        logits = model.logits(context, torch.where(masked, -1, codes), u * num_steps, num_steps)
        loss = F.cross_entropy(logits[masked], codes[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == p.steps - 1:
            print(f"[pretrain] step {step} loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    out = base_dir(cfg)
    model.eval().save_pretrained(out)
    policy.conditioner.save_pretrained(out)      # Meissonic: its (random) text encoder, beside the transformer
    atomic_write_json(out / "pretrain.json", {"steps": p.steps, "final_loss": float(np.mean(losses[-20:])),
                                              "seconds": time.perf_counter() - t0, "seed": cfg.seed,
                                              "world": world_record(cfg)})
    # written last: sizes and sha256 of every file, so that a damaged copy used as policy.init fails at start-up
    atomic_write_json(out / "manifest.json", {"format": "maskgrpo-policy/1", "files": file_manifest(out)})
    print(f"[pretrain] wrote {out}", flush=True)
    return out
