"""Converts the reference trajectories of `tiny_showo_trajectories.json` into `Trajectory` records."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from policy.layout import TokenLayout
from policy.trajectory import Trajectory


def load_reference_trajectories(fixture_dir: Path, layout: TokenLayout) -> dict[str, Trajectory]:
    data = json.loads((fixture_dir / "tiny_showo_trajectories.json").read_text())
    text = layout.text_area([data["prompt_text_ids"]])
    out = {}
    for name, tr in data["trajectories"].items():
        steps, n = tr["timesteps"], layout.num_vq_tokens
        unmask_step = torch.full((1, n), steps, dtype=torch.long)
        sampled = torch.full((1, steps, n), -1, dtype=torch.long)
        for t in range(steps):
            remasked = set(tr["remasked_positions"][t])
            for pos, code in zip(tr["unmasked_positions"][t], tr["unmasked_codes"][t]):
                sampled[0, t, pos] = code
                if pos not in remasked:
                    unmask_step[0, pos] = t
        out[name] = Trajectory(
            condition={"ids": text}, null_condition={"ids": layout.empty_text_area(1)}, unmask_step=unmask_step,
            sampled_codes=sampled, token_logprob=torch.zeros(1, steps, n), remask_logprob=torch.zeros(1, steps, n),
            threshold=torch.tensor([tr["min_confidence_prob"]], dtype=torch.float32),
            final_codes=torch.tensor([tr["final_codes"]], dtype=torch.long),
            meta={"advantage": tr["advantage"], "per_step_loss": tr["per_step_loss"]})
    return out
