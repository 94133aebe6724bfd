"""The Mask-GRPO learner: a DeepSpeed engine around the policy model (any `policy.family`), one optimizer step per
`train_step`.

One `Learner` per data-parallel rank. Each rank receives its own groups as `GroupUpdate`s — the G rollouts of
one prompt as one `Trajectory`, with the (sample, step) rows that train and their advantages, as the driver's plan
decided (`algorithm.plan`) — splits the rows into micro-batches of at most ``micro_batch_rows`` rows and runs
forward + backward through the DeepSpeed engine for each (so activation memory does not grow with T·G), then
takes ONE optimizer step. What a row computes is the algorithm's (`algorithm.transitions` scores it,
`algorithm.losses` turns it into a loss); the engine keeps the mechanics: micro-batches, padding, the proximal
recompute of stale rows, NaN poisoning, the optimizer step. The loss runs through the engine, never the bare module, so gradients are averaged across ranks
(the release's defect 5); each micro-batch's loss is scaled by the global normaliser times the world size, so
the update equals that of one rank holding the whole global batch.

All ranks must call `train_step`, `iter_weight_buckets` and `save_checkpoint` together (collectives inside).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from algorithm.config import AlgorithmConfig, LossAverage, StaleLogprobs
from algorithm.losses import policy_loss
from algorithm.transitions import transition as transition_definition
from policy.family import MaskedModel
from policy.logprob import RowView, Rows, step_logprobs
from policy.trajectory import Trajectory

from policy.device import resolve_device

from . import dist
from .config import LearnerConfig
from .lora import add_adapters, adapters_disabled, merge_state_dict, resolve_targets
from .memory import FIRST_UPDATE_BYTES_PER_PARAM, MicroBatchPlan, free_bytes, plan_micro_batches, trainable_numel
from .update import GroupUpdate, UpdateStats
from .weights_export import WeightBucket, iter_weight_buckets

log = logging.getLogger(__name__)


# The figures summed over a rank's micro-batches, kept on the device and read once at the end of the update (the
# UpdateStats fields of the same names, and the count of passes whose loss was not finite).
PASS_SUMS = ("loss", "nonfinite_passes", "clipped", "ratio_sum", "approx_kl_sum", "kl_sum", "on_policy_outside_clip")


class NonFiniteUpdateError(RuntimeError):
    """Too many consecutive updates had a NaN/inf loss or gradient (none of them was applied), or an applied update
    left non-finite weights (they are never saved or synced)."""


# ----- optimizer pieces --------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (incl. embeddings), none on biases and 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]     # LoRA: only matrices train (DeepSpeed drops empty groups)


class WarmupCosine:
    """LR factor for optimizer step s (0-based): linear warm-up (s+1)/W, then cosine to `min_ratio` at `total`.
    With ``overlap=True`` the cosine runs from step 0 and the warm-up scales it (the pretraining schedule, as
    Show-o's masked-token training: factor = min(1, (s+1)/W) · cosine(s/total)).

    A callable object (not a lambda) so that `LambdaLR.state_dict()` saves it with the scheduler."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0, overlap: bool = False):
        self.warmup, self.total, self.min_ratio, self.overlap = int(warmup), int(total), float(min_ratio), overlap

    def __call__(self, s: int) -> float:
        if self.overlap:
            progress = min(1.0, s / max(1, self.total))
            return min(1.0, (s + 1) / max(1, self.warmup)) * self._cosine(progress)
        if s < self.warmup:
            return (s + 1) / self.warmup
        return self._cosine(min(1.0, (s - self.warmup) / max(1, self.total - self.warmup)))

    def _cosine(self, progress: float) -> float:
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(config: LearnerConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of a learner: ZeRO stage, precision, clipping; accumulation is ours (GAS = 1,
    boundaries set by hand), the optimizer and scheduler are passed in as objects."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": bool(bf16), "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if config.grad_clip > 0:
        ds["gradient_clipping"] = config.grad_clip
    if bf16 and config.zero_stage == 1:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}     # DeepSpeed's BF16 optimizer: fp32 accumulation
    if bf16 and config.zero_stage == 0:
        log.warning("bf16 with ZeRO stage 0 accumulates gradients over the micro-batches in bf16; "
                    "prefer zero_stage >= 1 on GPUs")
    return _merge(ds, config.extra_deepspeed)


class PolicyObjective(nn.Module):
    """The module DeepSpeed wraps: the policy, and a forward that scores (sample, step) rows of a trajectory with
    the algorithm's transition."""

    def __init__(self, policy: MaskedModel, transition: str, prefix_reuse: bool = True):
        super().__init__()
        self.policy = policy
        self.transition = transition_definition(transition)
        self.prefix_reuse = prefix_reuse

    def forward(self, traj: Trajectory, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprob [R], num_terms [R]); plain tensors so that ZeRO-3's backward hooks see them."""
        out = self.transition.score(step_logprobs(self.policy, traj, rows, self.prefix_reuse), RowView.of(traj, rows))
        return out.logprob, out.num_terms


# ----- the work of one step ---------------------------------------------------------------------------------
@dataclass
class Chunk:
    """One micro-batch: `rows` of group `group`'s trajectory (host tensors, moved to the device per pass)."""
    group: int
    rows: Rows
    dummy: bool = False        # a zero-weight pass that keeps collective counts equal across ranks


def plan_chunks(trains: Sequence[torch.Tensor], max_rows: int) -> list[Chunk]:
    """Micro-batches of at most `max_rows` rows within each group, from the groups' train masks [G, T].

    A rectangle (every trained sample trains the same steps, as the paper's update): whole trajectories when they
    fit, else one trajectory's steps split into runs of equal length. Any other mask: samples packed in order, a
    sample's steps split into even runs when they alone exceed `max_rows`."""
    chunks = []
    for g, train in enumerate(trains):
        kept = train.any(1)
        samples = kept.nonzero().flatten()
        if samples.numel() == 0:
            continue
        steps = train[samples[0]].nonzero().flatten()
        if bool((train[samples] == train[samples[0]]).all()):          # a rectangle: samples x steps
            chunks += _rectangle_chunks(g, samples, steps, max_rows)
            continue
        pending: list[tuple[int, torch.Tensor]] = []
        size = 0
        for b in samples.tolist():
            st = train[b].nonzero().flatten()
            for run in _even_runs(st, max_rows):
                if size + run.numel() > max_rows and pending:
                    chunks.append(Chunk(g, _rows_of(pending)))
                    pending, size = [], 0
                pending.append((b, run))
                size += run.numel()
        if pending:
            chunks.append(Chunk(g, _rows_of(pending)))
    return chunks


def _even_runs(steps: torch.Tensor, max_rows: int) -> list[torch.Tensor]:
    """`steps` whole, or split into runs of equal length of at most `max_rows` (50 by 31 -> 25 + 25)."""
    if steps.numel() <= max_rows:
        return [steps]
    size = math.ceil(steps.numel() / math.ceil(steps.numel() / max_rows))
    return [steps[j:j + size] for j in range(0, steps.numel(), size)]


def _rectangle_chunks(g: int, samples: torch.Tensor, steps: torch.Tensor, max_rows: int) -> list[Chunk]:
    if steps.numel() <= max_rows:
        per = max(1, max_rows // steps.numel())
        return [Chunk(g, Rows.grid(samples[i:i + per], steps)) for i in range(0, samples.numel(), per)]
    return [Chunk(g, Rows.grid(b.view(1), run)) for b in samples for run in _even_runs(steps, max_rows)]


def _rows_of(pending: list[tuple[int, torch.Tensor]]) -> Rows:
    """Rows of (sample, steps) runs, sample-major (a sample split across runs keeps one entry per run)."""
    samples = torch.cat([torch.full((st.numel(),), b, dtype=torch.long) for b, st in pending])
    steps = torch.cat([st for _, st in pending])
    unique, counts = torch.unique_consecutive(samples, return_counts=True)
    counts = counts.tolist()
    return Rows(samples, steps, unique, counts[0] if len(set(counts)) == 1 else counts)


class Learner:
    """Mask-GRPO learner on one data-parallel rank (see module doc). The model passed in is taken over
    (DeepSpeed may cast and, under ZeRO-3, partition it); its trained weights are in ``learner.policy``.
    `device`: "auto" (CUDA when this process sees a GPU), "cpu" or "cuda"."""

    def __init__(self, model: MaskedModel, config: LearnerConfig, algorithm: Optional[AlgorithmConfig] = None,
                 reference: Optional[MaskedModel] = None, device: str | torch.device = "auto"):
        self.device = resolve_device(device)
        dist.init_distributed(self.device)
        import deepspeed

        self.config = config
        self.algorithm = algorithm = algorithm or AlgorithmConfig()
        self.loss = policy_loss(algorithm)
        self.rank, self.world_size = dist.rank(), dist.world_size()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.bf16 = self.device.type == "cuda" if config.bf16 is None else bool(config.bf16)
        if self.bf16 and self.device.type != "cuda":
            raise ValueError("bf16 training needs CUDA; on the CPU use bf16=False (or None for auto)")
        model.gradient_checkpointing = bool(config.gradient_checkpointing)   # re-decided per update when auto
        if config.lora.enabled:         # only the adapters train: AdamW and ZeRO state cover only them
            config = replace(config, lora=resolve_targets(config.lora, model))   # the family's layers, named
            self.config = config
            add_adapters(model, config.lora)
        self.lora = config.lora
        model.to(self.device)

        # A frozen reference exists only for a real KL term (kl_beta == 0: no reference model at all). With LoRA
        # the reference is the policy itself with its adapters switched off (no second copy).
        self.reference: Optional[MaskedModel] = None
        if self.lora.enabled and reference is not None:
            raise ValueError("with learner.lora the KL reference is the base model (adapters off): pass no reference")
        if algorithm.kl_beta > 0 and not self.lora.enabled:
            ref = reference if reference is not None else copy.deepcopy(model)
            ref.gradient_checkpointing = False
            self.reference = ref.to(self.device, torch.bfloat16 if self.bf16 else torch.float32).eval()
            self.reference.requires_grad_(False)
        elif reference is not None:
            raise ValueError("a reference policy was given but kl_beta == 0: it would never be used")

        self.objective = PolicyObjective(model, algorithm.transition, config.prefix_reuse)
        if config.zero_stage == 3:
            # parameters the model reads outside their module's forward (Show-o: lm_head's codebook slice)
            for p in model.zero3_external_parameters():
                deepspeed.zero.register_external_parameter(self.objective, p)
        self._torch_optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                                  betas=config.betas, eps=config.adam_eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._torch_optimizer, WarmupCosine(config.warmup_steps, config.total_steps, config.min_lr_ratio))
        self.ds_config = deepspeed_config(config, self.bf16)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.objective, optimizer=self._torch_optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.engine.train()
        self.policy: MaskedModel = self.engine.module.policy
        self.step = 0                   # optimizer updates applied == weight version
        self.nonfinite_total = 0
        self.consecutive_nonfinite = 0
        self.last_checkpoint: Optional[str] = None
        self.ruined: Optional[str] = None  # why the weights are non-finite: never saved or synced again
        self.driver_state: Optional[dict[str, Any]] = None   # the caller's own JSON state, kept in checkpoints
        self.micro_batch_plan: Optional[MicroBatchPlan] = None
        self._updated = False           # an optimizer step ran in this process (its state is allocated)
        self._plan_final = False

    # ----- properties -----------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The weight version: optimizer updates applied so far (rollouts record it as `policy_version`)."""
        return self.step

    @property
    def has_reference(self) -> bool:
        """A KL term is computed (against a frozen copy, or with LoRA the base with the adapters off)."""
        return self.algorithm.kl_beta > 0

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ----- the training step ----------------------------------------------------------------------------------
    def train_step(self, groups: Sequence[GroupUpdate]) -> UpdateStats:
        """One optimizer update from this rank's groups (all ranks call it together, each with its own groups,
        possibly none). The driver decided the rows and their advantages (`algorithm.plan`); returns this rank's
        figures (merge ranks with `UpdateStats.merge`)."""
        return self.apply_update(self.accumulate_gradients(groups))

    def accumulate_gradients(self, groups: Sequence[GroupUpdate]) -> UpdateStats:
        """Forward/backward of every micro-batch (no optimizer step); see `train_step`."""
        t0 = time.perf_counter()
        for g in groups:
            _check_group(g)
        plan = self._plan_micro_batches()
        chunks = plan_chunks([g.train for g in groups], plan.rows)
        # The loss normaliser is global (the update equals that of one rank holding the whole batch), and every
        # rank runs as many backward passes as the busiest one (ZeRO reduces during each backward).
        kept, terms = self._batch_size(groups)
        g_kept, g_terms = dist.all_reduce([kept, terms])
        (n_chunks,) = dist.all_reduce([len(chunks)], op="max")
        stats = UpdateStats(micro_batches=float(n_chunks), has_reference=self.has_reference,
                            micro_batch_rows=float(plan.rows), checkpointing=plan.checkpointing)
        stats.seconds_forward_backward = -t0     # completed below
        if g_kept == 0:
            stats.no_signal_skipped = True
            return stats
        # Pad with zero-weight passes over a real row (or a synthetic one on a rank that received no group).
        # Trajectories move to the device once; the figures stay on it until the end (no host sync per pass).
        pool = [g.trajectory.to(self.device) for g in groups] or [self._dummy_trajectory()]
        while len(chunks) < int(n_chunks):
            chunks.append(Chunk(0, Rows.grid([0], [0]), dummy=True))
        behaviour = self._behaviour(groups, chunks, pool, stats)
        norm = (lambda tr: 1.0 / (tr.num_steps * g_kept)) if self.algorithm.loss_average == LossAverage.sequence \
            else (lambda tr: 1.0 / g_terms)                   # per row: 1/(T·M) ("sequence") or 1/(scored terms)
        sums = torch.zeros(len(PASS_SUMS), dtype=torch.float64, device=self.device)   # named by PASS_SUMS
        ratio_max = torch.zeros((), dtype=torch.float64, device=self.device)
        on_policy: list[torch.Tensor] = []
        for i, ch in enumerate(chunks):
            self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            tr, rows = pool[ch.group], ch.rows.to(self.device)
            logp = self._forward(tr, rows, stats).float()
            if ch.dummy:   # same graph, zero gradient; independent of the (possibly non-finite) data terms
                self.engine.backward(logp.sum() * 0.0)
                continue
            g = groups[ch.group]
            adv = g.advantages.to(self.device)
            adv = adv[rows.samples] if adv.dim() == 1 else adv[rows.samples, rows.steps]
            rl = self.loss(logp, behaviour[ch.group][rows.samples, rows.steps], adv, self._reference(tr, rows, stats))
            loss = rl.loss.sum() * norm(tr)
            # A NaN row can still give finite gradients (clamp/min mask it), so a non-finite loss poisons the
            # gradients instead: DeepSpeed's overflow check (or ours for a plain optimizer) then discards the whole
            # update on every rank. Decided on the device: no host read of the loss here.
            finite = torch.isfinite(loss)
            poison = torch.where(finite, 0.0, float("nan"))
            self.engine.backward(torch.where(finite, loss, 0.0) * self.world_size + logp.sum() * poison)
            staleness = self.version - tr.policy_version
            r = rl.ratio
            a = self.algorithm
            terms = {"loss": loss.detach(), "nonfinite_passes": (~finite).float(), "clipped": rl.clipped.sum().float(),
                     "ratio_sum": r.sum(), "approx_kl_sum": rl.approx_kl.sum(),
                     "kl_sum": rl.kl.sum() if rl.kl is not None else r.new_zeros(()),
                     "on_policy_outside_clip": ((r < a.clip_low) | (r > a.clip_high)).sum().float() * (staleness == 0)}
            sums += torch.stack([terms[k] for k in PASS_SUMS]).double()
            ratio_max = torch.maximum(ratio_max, r.max().double())
            stats.rows += len(rows)
            stats.stale_sum += staleness * len(rows)
            if staleness == 0:
                on_policy.append((r - 1.0).abs())
        totals = dict(zip(PASS_SUMS + ("ratio_max",), torch.cat([sums, ratio_max.view(1)]).tolist()))   # one read
        for name, value in totals.items():
            if name != "nonfinite_passes":
                setattr(stats, name, value)
        stats.on_policy_dev = torch.cat(on_policy).tolist() if on_policy else []
        stats.nonfinite_skipped = totals["nonfinite_passes"] > 0   # this rank's view; skipped on every rank
        stats.seconds_forward_backward += time.perf_counter()
        return stats

    def _batch_size(self, groups: Sequence[GroupUpdate]) -> tuple[int, float]:
        """This rank's share of the normaliser: samples with a trained row, and (per-token averaging) the positions
        its rows score (from the record alone)."""
        kept = sum(int(g.train.any(1).sum()) for g in groups)
        if self.algorithm.loss_average != LossAverage.token:
            return kept, 0.0
        transition = self.objective.transition
        terms = sum(float(transition.num_terms(RowView.of(g.trajectory, Rows.of_mask(g.train))).sum())
                    for g in groups)
        return kept, terms

    def _forward(self, traj: Trajectory, rows: Rows, stats: UpdateStats) -> torch.Tensor:
        """The rows' transition log-probs [R] through the engine (the policy's gradients), counted."""
        stats.learner_tokens += self._tokens(traj, rows)
        return self.engine(traj, rows)[0].reshape(-1)

    def _tokens(self, traj: Trajectory, rows: Rows) -> float:
        """Image-token positions a forward pass over `rows` evaluates (a guided trajectory's: two passes)."""
        return float(len(rows) * traj.num_image_tokens * (2 if traj.guidance_weight != 0.0 else 1))

    def _reference(self, traj: Trajectory, rows: Rows, stats: UpdateStats) -> Optional[torch.Tensor]:
        """The KL reference's log-probs [R] of the rows (None without a KL term): a frozen copy, or with LoRA the
        policy with its adapters off, run through the engine (ZeRO-3 gathers the parameters there)."""
        if not self.has_reference:
            return None
        stats.learner_tokens += self._tokens(traj, rows)
        with torch.no_grad():
            if self.reference is not None:
                out = self.objective.transition.score(
                    step_logprobs(self.reference, traj, rows, self.config.prefix_reuse), RowView.of(traj, rows))
                return out.logprob.float().reshape(-1)
            with adapters_disabled(self.policy):
                return self.engine(traj, rows)[0].float().reshape(-1)

    def _behaviour(self, groups: Sequence[GroupUpdate], chunks: list[Chunk], pool: list[Trajectory],
                   stats: UpdateStats) -> list[torch.Tensor]:
        """Each group's behaviour log-probs [G, T] on the device: given by the driver, else recorded by the
        sampler; a stale group's trained rows (`algorithm.stale_logprobs: recompute`) recomputed under the weights
        at the start of this update (the proximal policy)."""
        transition = self.objective.transition
        beh = [(g.behaviour_logprob if g.behaviour_logprob is not None
                else transition.behaviour(g.trajectory)).detach().float().to(self.device) for g in groups]
        stale = [g.behaviour_logprob is None and g.trajectory.policy_version != self.version for g in groups]
        if self.algorithm.stale_logprobs == StaleLogprobs.recompute and any(stale):
            beh = self._proximal_logprobs(chunks, pool, beh, stale, stats)
        return beh

    def _plan_micro_batches(self) -> MicroBatchPlan:
        """Rows per micro-batch and checkpointing (`learner.memory`). With an `auto` setting on a GPU the plan is
        made before the first update (keeping room for the optimizer state it allocates) and once more after it,
        then kept: rows that change with every reading of free memory would make updates irreproducible."""
        cfg = self.config
        if self.micro_batch_plan is not None and self._plan_final:
            return self.micro_batch_plan
        auto = cfg.micro_batch_rows == 0 or cfg.gradient_checkpointing is None
        reserved = 0
        if auto and not self._updated and self.device.type == "cuda":
            reserved = FIRST_UPDATE_BYTES_PER_PARAM * trainable_numel(self.policy)   # with LoRA: the adapters
        plan = plan_micro_batches(self.policy.activation_bytes_per_row, cfg.micro_batch_rows,
                                  cfg.gradient_checkpointing, free_bytes(self.device) if auto else None, reserved)
        self._plan_final = self._updated or not auto or self.device.type != "cuda"
        if self.micro_batch_plan is None or (plan.rows, plan.checkpointing) != (self.micro_batch_plan.rows,
                                                                               self.micro_batch_plan.checkpointing):
            print(f"[maskgrpo] learner rank {self.rank}: {plan}", flush=True)   # shown by the driver too
        self.policy.gradient_checkpointing = plan.checkpointing
        self.micro_batch_plan = plan
        return plan

    @torch.no_grad()
    def _proximal_logprobs(self, chunks: list[Chunk], trajectories: list[Trajectory], beh: list[torch.Tensor],
                           stale: list[bool], stats: UpdateStats) -> list[torch.Tensor]:
        """The log-probs of the stale groups' trained rows under the weights at the start of this update (no
        gradients), replacing their recorded behaviour log-probs; `stats` gets how far the two were apart."""
        out = [b.clone() if s else b for b, s in zip(beh, stale)]
        kl = torch.zeros((), dtype=torch.float64, device=self.device)
        for ch in chunks:
            if ch.dummy or not stale[ch.group]:
                continue
            rows = ch.rows.to(self.device)
            proximal = self._forward(trajectories[ch.group], rows, stats).float()
            recorded = beh[ch.group][rows.samples, rows.steps]
            out[ch.group][rows.samples, rows.steps] = proximal
            log_w = (proximal - recorded).double()
            stats.stale_rows += float(log_w.numel())
            kl += (log_w.exp() - 1.0 - log_w).sum()
        stats.stale_behaviour_kl = float(kl)
        return out

    def _dummy_trajectory(self) -> Trajectory:
        """A one-step, one-rollout trajectory of the policy's shapes, for zero-weight padding passes."""
        n = self.policy.num_tokens
        return Trajectory(condition=self.policy.padding_condition(), null_condition={},
                          unmask_step=torch.zeros(1, n, dtype=torch.long),
                          sampled_codes=torch.zeros(1, 1, n, dtype=torch.long),
                          token_logprob=torch.zeros(1, 1, n), remask_logprob=torch.zeros(1, 1, n),
                          threshold=torch.zeros(1, 1), final_codes=torch.zeros(1, n, dtype=torch.long))

    def _own_grad_check(self) -> Optional[float]:
        """Global grad norm for a plain torch optimizer (ZeRO 0, fp32); None when DeepSpeed checks itself."""
        if self.engine.optimizer is not self._torch_optimizer:
            return None
        sq = torch.zeros((), dtype=torch.float64)
        for p in self.policy.parameters():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum().cpu()
        return float(sq.sqrt())

    def apply_update(self, stats: UpdateStats) -> UpdateStats:
        """The optimizer step after `accumulate_gradients`, unless the loss or a gradient is not finite."""
        t0 = time.perf_counter()
        stats.lr = self.lr
        skipped_nonfinite = False
        if stats.no_signal_skipped:
            log.info("learner step skipped: no group with reward signal (all groups filtered)")
        else:
            own_norm = self._own_grad_check()
            if own_norm is not None:
                if stats.nonfinite_skipped or not math.isfinite(own_norm):
                    self.engine.zero_grad()
                    skipped_nonfinite = True
                else:
                    self.engine.step()
                stats.grad_norm = own_norm
            else:
                self.engine.step()
                skipped_nonfinite = not self.engine.was_step_applied()
                gn = self.engine.get_global_grad_norm()
                stats.grad_norm = float(gn) if gn is not None else float("nan")
                if stats.nonfinite_skipped and not skipped_nonfinite:
                    log.warning("non-finite loss but finite gradients: DeepSpeed applied the update")
        if skipped_nonfinite:
            self.nonfinite_total += 1
            self.consecutive_nonfinite += 1
            log.warning("learner step skipped: non-finite loss or gradient (%d in a row, %d in total)",
                        self.consecutive_nonfinite, self.nonfinite_total)
        elif not stats.no_signal_skipped:
            if not self._weights_finite():
                where = (f"the last good checkpoint {self.last_checkpoint!r} is intact"
                         if self.last_checkpoint else "no checkpoint was saved by this learner yet")
                self.ruined = (f"learner update {self.step + 1} (weight version {self.step} -> {self.step + 1}) left "
                               f"NaN/inf weights although its loss and gradients were finite: the step was too large "
                               f"(learner.lr={self.config.lr:g}, lr now {stats.lr:g}) or the optimizer state is "
                               f"damaged. Nothing was saved or synced after it; {where}. Lower learner.lr (keep "
                               f"learner.grad_clip > 0), then resume=auto")
                raise NonFiniteUpdateError(self.ruined)
            self.consecutive_nonfinite = 0
            self.step += 1
            self._updated = True
        stats.nonfinite_skipped = skipped_nonfinite
        stats.nonfinite_total = self.nonfinite_total
        stats.version = self.version
        stats.seconds_step = time.perf_counter() - t0
        if self.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
            where = (f"the last good checkpoint {self.last_checkpoint!r} is intact"
                     if self.last_checkpoint else "no checkpoint was saved by this learner yet")
            raise NonFiniteUpdateError(
                f"{self.consecutive_nonfinite} consecutive learner steps had a NaN/inf loss or gradient and were "
                f"skipped (no update applied, parameters unchanged since step {self.step}); {where}. Check the "
                f"rewards, the recorded behaviour log-probs and the learning rate, then resume from it.")
        return stats

    def _weights_finite(self) -> bool:
        """Whether every weight is finite, after an update: one fused max-|w| over the weights this rank holds
        (under ZeRO-3 its partitions) on the device, read once; collective (every rank gets the same answer)."""
        held = [getattr(p, "ds_tensor", p).detach() for p in self.policy.parameters()]
        held = [t for t in held if t.numel()]
        finite = 1.0
        if held:
            peaks = torch._foreach_norm(held, float("inf"))
            finite = float(torch.stack([t.float() for t in peaks]).isfinite().all())
        (finite,) = dist.all_reduce([finite], op="min")
        return finite > 0

    def _refuse_if_ruined(self, what: str) -> None:
        if self.ruined is not None:
            raise NonFiniteUpdateError(f"not {what}: {self.ruined}")

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every policy parameter's full accumulated gradient (fp32 CPU copies), between `accumulate_gradients`
        and `apply_update`; collective under ZeRO (all ranks call it)."""
        from deepspeed.utils import safe_get_full_grad
        out = {}
        for name, p in self.policy.named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                out[name] = g.detach().float().cpu().clone()
        return out

    # ----- weights ------------------------------------------------------------------------------------------------
    def iter_weight_buckets(self, bucket_bytes: int = 256 << 20, dtype: Optional[torch.dtype] = None,
                            adapters_only: Optional[bool] = None) -> Iterator[WeightBucket]:
        """The weights a rollout worker needs, in buckets (rank 0 yields; every rank must exhaust the iterator):
        with LoRA only the adapter tensors (`adapters_only` None = whether LoRA is on), else every parameter."""
        self._refuse_if_ruined("syncing the weights")
        only = self.lora.enabled if adapters_only is None else adapters_only
        return iter_weight_buckets(self.policy, bucket_bytes, self.version, self.rank, dtype, adapters_only=only)

    def _gathered(self, adapters_only: bool) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for bucket in self.iter_weight_buckets(adapters_only=adapters_only):
            for name, t in bucket.to("cpu").tensors():
                sd[name] = t.clone()
        return sd

    def gathered_adapters(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter tensors on rank 0 (our parameter names, CPU); {} on other ranks. Collective."""
        return self._gathered(adapters_only=True)

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """The full policy state dict on rank 0 in the released key layout (CPU; with LoRA the merged weights,
        W + (alpha/rank)·B·A, in fp32); {} on other ranks. Collective."""
        sd = self._gathered(adapters_only=False)
        return merge_state_dict(sd, self.lora) if self.lora.enabled and sd else sd

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total,
                "consecutive_nonfinite": self.consecutive_nonfinite, "config": self.config.to_dict(),
                "algorithm": self.algorithm.to_dict(),
                "world_size": self.world_size, "driver_state": self.driver_state}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.driver_state = state.get("driver_state")

    def save_checkpoint(self, root: str | Path, keep_last: int = 0) -> Path:
        from .checkpoint import save_checkpoint
        self._refuse_if_ruined("saving a checkpoint")
        return save_checkpoint(self, root, keep_last=keep_last)

    def resume(self, path: str | Path) -> Path:
        """Load a checkpoint directory, or the latest complete one under a checkpoints root."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(self, path)


def _check_group(g: GroupUpdate) -> None:
    """The driver's plan must fit the trajectory (a mismatch is a bug upstream; name it before any compute)."""
    tr = g.trajectory
    if not isinstance(tr, Trajectory):
        raise TypeError(f"group {g.group_id}: expected a fetched Trajectory, got {type(tr).__name__}")
    rows = (tr.batch_size, tr.num_steps)
    if tuple(g.advantages.shape) not in ((tr.batch_size,), rows) or tuple(g.train.shape) != rows \
            or g.train.dtype != torch.bool:
        raise ValueError(f"group {g.group_id}: advantages {tuple(g.advantages.shape)} and train mask "
                         f"{tuple(g.train.shape)} ({g.train.dtype}) must have shapes {(tr.batch_size,)} (or {rows}) "
                         f"and {rows} (bool)")
    if g.behaviour_logprob is not None and tuple(g.behaviour_logprob.shape) != rows:
        raise ValueError(f"group {g.group_id}: behaviour_logprob has shape {tuple(g.behaviour_logprob.shape)}, "
                         f"expected {rows}")
