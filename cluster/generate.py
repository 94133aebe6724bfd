"""`maskgrpo generate`: prompts → a PNG grid and the codes, with a progress bar over the unmasking steps."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from policy.device import resolve_device
from policy.factory import load_policy
from policy.files import atomic_write, atomic_write_json
from policy.images import save_captioned_grid
from policy.sampler import UnmaskingSampler

from .config import ConfigError, section, world_kwargs
from .data import GENERATE_STEP, sample_seeds
from .preflight import prepare_output_dir


def generate(cfg: DictConfig, prompts: list[str], num_images: int = 1, out_name: str = "generate") -> Path:
    if num_images < 1:
        raise ConfigError(f"--num-images {num_images}: give at least 1 image per prompt")
    prepare_output_dir(cfg.output_dir)
    device = resolve_device(cfg.device)
    policy = load_policy(section(cfg, "policy"), device, world=world_kwargs(cfg))
    sampler_cfg = section(cfg, "sampler")
    sampler = UnmaskingSampler(policy.model.eval(), sampler_cfg)
    seeds = [x for i in range(len(prompts)) for x in sample_seeds(cfg.seed, GENERATE_STEP, i, num_images)]
    null = policy.null_condition(sampler_cfg.negative_prompt)
    with tqdm(total=sampler_cfg.steps, desc="unmasking", unit="step", disable=not cfg.logging.progress) as bar:
        traj = sampler.sample(policy.condition(prompts), seeds, group_size=num_images, null_condition=null,
                              on_step=lambda t: bar.update())
    images = policy.decode(traj.final_codes.to(device))
    out = Path(cfg.output_dir) / out_name
    out.mkdir(parents=True, exist_ok=True)
    grid = save_captioned_grid(images, out / "grid.png", prompts, nrow=num_images, scale=max(1, 256 // images.shape[1]))
    codes = {"codes": traj.final_codes, "prompts": prompts, "num_images": num_images, "seeds": seeds}
    atomic_write(out / "codes.pt", lambda tmp: torch.save(codes, tmp))
    atomic_write_json(out / "prompts.json", prompts)
    return grid
