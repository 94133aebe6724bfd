"""The policy's log-probabilities at recorded (sample, step) rows of trajectories: what the learner scores.

Rows are (sample, step) pairs of one trajectory batch, grouped by sample (`Rows`): any subset of steps per sample,
as a train mask says, or every sample at the same steps (`Rows.grid`). They become the rows of one forward pass,
each fed the image exactly as the sampler saw it at the start of that step; the model's context is built once per
distinct sample and shared by its rows (Show-o: the text prefix, with gradients flowing through it). The
log-probabilities come out in fp32 ONCE per row (`policy.transition.codebook_logprobs`); what a transition sums of
them is the algorithm's (`algorithm.transitions`), read through `RowView`.

Device use: the trajectory may arrive on the CPU (as it does from the object store); it is moved to the model's
device once, every mask and index is built there, and nothing is read back to the host (no GPU sync): the rows'
per-sample counts are host values planned before any forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .family import MaskedModel, select_rows
from .trajectory import Trajectory
from .transition import codebook_logprobs


@dataclass
class Rows:
    """(sample, step) rows of a trajectory batch, grouped by sample in increasing order: long `samples` [R] and
    `steps` [R], the distinct samples `unique` [U] and each one's row count `counts` (host ints; one int when every
    sample has the same: the rectangular case)."""
    samples: torch.Tensor
    steps: torch.Tensor
    unique: torch.Tensor
    counts: int | list[int]

    @staticmethod
    def grid(samples: torch.Tensor | Sequence[int], steps: torch.Tensor | Sequence[int]) -> "Rows":
        """Every sample at every step of `steps`, sample-major (row b·S + j is sample b at steps[j])."""
        samples = torch.as_tensor(samples, dtype=torch.long)
        steps = torch.as_tensor(steps, dtype=torch.long)
        b, s = samples.numel(), steps.numel()
        return Rows(samples.repeat_interleave(s), steps.repeat(b), samples, s)

    @staticmethod
    def of_mask(train: torch.Tensor) -> "Rows":
        """The True entries of a bool [B, T] train mask (a host tensor), sample-major."""
        samples, steps = train.nonzero(as_tuple=True)
        unique, counts = torch.unique_consecutive(samples, return_counts=True)
        counts = counts.tolist()
        return Rows(samples, steps, unique, counts[0] if len(set(counts)) == 1 else counts)

    def __len__(self) -> int:
        return int(self.samples.numel())

    @property
    def repeats(self) -> int | torch.Tensor:
        """Rows per distinct sample, as `MaskedModel.context` takes them."""
        return self.counts if isinstance(self.counts, int) else torch.tensor(self.counts, dtype=torch.long)

    def to(self, device: torch.device | str) -> "Rows":
        return Rows(self.samples.to(device), self.steps.to(device), self.unique.to(device), self.counts)


@dataclass
class RowView:
    """What the transitions read of the rows (all on the device): the positions masked at the start of the row's
    step, kept (committed) and re-masked at it, the codes drawn at it, and its confidence threshold."""
    masked: torch.Tensor       # bool [R, N]
    kept: torch.Tensor         # bool [R, N]
    remasked: torch.Tensor     # bool [R, N]
    drawn: torch.Tensor        # long [R, N] (-1 where nothing was drawn)
    threshold: torch.Tensor    # float [R]

    @staticmethod
    def of(traj: Trajectory, rows: Rows) -> "RowView":
        u = traj.unmask_step[rows.samples]
        t = rows.steps.view(-1, 1)
        return RowView(u >= t, u == t, u > t, traj.sampled_codes[rows.samples, rows.steps],
                       traj.threshold[rows.samples, rows.steps])

    def positions(self, which: str) -> torch.Tensor:
        return {"masked": self.masked, "kept": self.kept, "remasked": self.remasked}[which]


def checked_steps(steps: Optional[torch.Tensor | Sequence[int]], num_steps: int) -> torch.Tensor:
    """`steps` as a long host tensor (default: all steps), range-checked (a host check: no device read)."""
    if steps is None:
        return torch.arange(num_steps)
    if not isinstance(steps, torch.Tensor):
        steps = torch.tensor(list(steps), dtype=torch.long)
    if steps.dim() != 1 or steps.device.type != "cpu":
        raise ValueError(f"steps must be a 1-D host tensor of step indices, got shape {tuple(steps.shape)} on "
                         f"{steps.device}")
    values = steps.tolist()
    if values and (min(values) < 0 or max(values) >= num_steps):
        raise ValueError(f"steps must lie in [0, {num_steps})")
    return steps.long()


def step_logprobs(model: MaskedModel, traj: Trajectory, rows: Rows, prefix_reuse: bool = True) -> torch.Tensor:
    """fp32 log-probabilities [R, N, C] of the rows under `model` (guided by the trajectory's recorded weight).
    `traj` and `rows` must be on the model's device. Runs with or without autograd, as the caller chooses."""
    codes = traj.input_codes_at(rows.samples, rows.steps)
    weight = float(traj.guidance_weight)

    def logits_for(condition) -> torch.Tensor:
        context = model.context([(select_rows(condition, rows.unique), rows.repeats)], inference=False,
                                reuse=prefix_reuse)
        return model.logits(context, codes, rows.steps, traj.num_steps)

    logits = logits_for(traj.condition)
    uncond = logits_for(traj.null_condition) if weight != 0.0 else None
    return codebook_logprobs(logits, uncond, weight)
