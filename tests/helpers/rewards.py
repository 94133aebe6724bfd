"""Test-only rewards (constant, environment variable, pixel mean, flaky via a flag file, failing, NaN) and a toy code decoder.

Nothing here is registered by name: use import paths, e.g. ``{"name": "tests.helpers.rewards:FlakyReward", ...}``
(reward actors import them: the repository root is on their PYTHONPATH)."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from rewards.base import Reward, RewardOutput


class ConstantReward(Reward):
    """Every sample scores `value`. The test rewards take the reward actor's `device` option and compute on the
    CPU whatever it says (they are arithmetic on a few numbers)."""

    def __init__(self, value: float = 1.0, batch_size: Optional[int] = None, device: Optional[str] = None):
        self.value, self.batch_size = float(value), batch_size

    def _score(self, images, prompts, metadata):
        return torch.full((images.shape[0],), self.value)


class EnvVarReward(Reward):
    """Every sample scores float(os.environ[var]), or `missing` where the variable is unset: which environment
    the scoring process sees (per-reward runtime_env)."""

    def __init__(self, var: str, missing: float = -1.0, device: Optional[str] = None):
        self.var, self.missing = var, float(missing)

    def _score(self, images, prompts, metadata):
        return torch.full((images.shape[0],), float(os.environ.get(self.var, self.missing)))


class PixelMeanReward(Reward):
    """Mean pixel value in [0, 1] (a cheap deterministic image function); details: the prompt length."""

    def __init__(self, device: Optional[str] = None):
        pass

    def _score(self, images, prompts, metadata):
        return RewardOutput(images.float().mean(dim=(1, 2, 3)) / 255.0,
                            details={"prompt_len": torch.tensor([float(len(p)) for p in prompts])})


class SeenInputsReward(Reward):
    """Scores 0 and reports what it was given: the images' height (0: none), whether each sample's metadata has
    self_certainty, and the sum of its codes (-1: none). ``needs`` here is nothing: a spec adds inputs."""
    needs = ()

    def __init__(self, device: Optional[str] = None):
        pass

    def _score(self, images, prompts, metadata):
        return RewardOutput(torch.zeros(len(prompts)), details={
            "height": torch.full((len(prompts),), float(images.shape[1])),
            "self_certainty": torch.tensor([float("self_certainty" in m) for m in metadata]),
            "codes": torch.tensor([float(sum(m["codes"])) if "codes" in m else -1.0 for m in metadata])})


class FlakyReward(PixelMeanReward):
    """Raises once while `flag_file` exists (deleting it), then scores normally: a one-off injected failure.
    With ``crash: true`` it kills its process instead of raising (an actor death)."""

    def __init__(self, flag_file: str, crash: bool = False, device: Optional[str] = None):
        self.flag_file, self.crash = flag_file, crash

    def _score(self, images, prompts, metadata):
        if os.path.exists(self.flag_file):
            os.remove(self.flag_file)
            if self.crash:
                os._exit(1)
            raise RuntimeError(f"injected failure (flag file {self.flag_file})")
        return super()._score(images, prompts, metadata)


class FailingReward(Reward):
    """Always raises."""

    def __init__(self, device: Optional[str] = None):
        pass

    def _score(self, images, prompts, metadata):
        raise RuntimeError("this reward always fails")


class NaNReward(PixelMeanReward):
    """Returns NaN for sample `index` of each batch."""

    def __init__(self, index: int = 0, device: Optional[str] = None):
        self.index = index

    def _score(self, images, prompts, metadata):
        s = super()._score(images, prompts, metadata).scores
        s[self.index] = float("nan")
        return s


def make_palette_decoder(height: int = 32, width: int = 32, codebook: int = 16) -> Callable[[torch.Tensor], torch.Tensor]:
    """A toy decoder factory: codes long [B,N] (N a square) -> uint8 [B,H,W,3], each code a flat colour patch."""
    g = torch.Generator().manual_seed(0)
    palette = torch.randint(0, 256, (codebook, 3), generator=g, dtype=torch.uint8)

    def decode(codes: torch.Tensor) -> torch.Tensor:
        b, n = codes.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"palette decoder needs a square number of codes, got {n}")
        grid = palette[codes.long() % codebook].view(b, side, side, 3).permute(0, 3, 1, 2).float()
        img = torch.nn.functional.interpolate(grid, size=(height, width), mode="nearest")
        return img.permute(0, 2, 3, 1).to(torch.uint8).contiguous()
    return decode
