"""The Mask-GRPO learner: a DeepSpeed engine around the Show-o policy, one optimizer step per `train_step`.

One `Learner` per data-parallel rank. Each rank receives its own groups (a group = the G rollouts of one
prompt, as one `Trajectory`), computes advantages, picks the steps to train (`learner.reduction`), splits the
(trajectory, step) rows into micro-batches of at most ``micro_batch_rows`` rows and runs forward + backward
through the DeepSpeed engine for each (so activation memory does not grow with T·G), then takes ONE optimizer
step. The loss runs through the engine, never the bare module, so gradients are averaged across ranks
(the release's defect 5); each micro-batch's loss is scaled by the global normaliser times the world size, so
the update equals that of one rank holding the whole global batch.

All ranks must call `train_step`, `iter_weight_buckets` and `save_checkpoint` together (collectives inside).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from policy.logprob import transition_logprobs
from policy.showo import Showo
from policy.trajectory import Trajectory

from . import dist
from .advantages import AdvantageResult, PromptStatTracker, RewardError, check_rewards, compute_advantages
from .config import LearnerConfig
from .loss import mask_grpo_row_loss, scored_terms
from .reduction import select_steps
from .weights_export import WeightBucket, iter_weight_buckets

log = logging.getLogger(__name__)


class NonFiniteUpdateError(RuntimeError):
    """Too many consecutive updates had a NaN/inf loss or gradient; none of them was applied."""


# ----- optimizer pieces --------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (incl. embeddings), none on biases and 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR factor for optimizer step s (0-based): linear warm-up (s+1)/W, then cosine to `min_ratio` at `total`.

    A callable object (not a lambda) so that `LambdaLR.state_dict()` saves it with the scheduler."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
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
    """The module DeepSpeed wraps: the policy, and a forward that scores (trajectory, step) rows."""

    def __init__(self, policy: Showo, transition: str, prefix_reuse: bool = True):
        super().__init__()
        self.policy = policy
        self.transition = transition
        self.prefix_reuse = prefix_reuse

    def forward(self, traj: Trajectory, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprob [B, S], num_terms [B, S]); plain tensors so that ZeRO-3's backward hooks see them."""
        out = transition_logprobs(self.policy, traj, self.transition, steps, self.prefix_reuse)
        return out.logprob, out.num_terms


# ----- the work of one step ---------------------------------------------------------------------------------
@dataclass
class Chunk:
    """One micro-batch: `samples` of group `group` at `steps` (rows = samples × steps)."""
    group: int
    samples: torch.Tensor      # long [B']
    steps: torch.Tensor        # long [S']
    dummy: bool = False        # a zero-weight pass that keeps collective counts equal across ranks

    @property
    def rows(self) -> int:
        return self.samples.numel() * self.steps.numel()


def plan_chunks(keep: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], max_rows: int) -> list[Chunk]:
    """Rectangular micro-batches within each group: whole trajectories (all trained steps) when they fit,
    else one trajectory's steps split into runs of `max_rows`."""
    chunks = []
    for g, (k, st) in enumerate(zip(keep, steps)):
        samples = k.nonzero().flatten()
        if samples.numel() == 0 or st.numel() == 0:
            continue
        if st.numel() <= max_rows:
            per = max(1, max_rows // st.numel())
            for i in range(0, samples.numel(), per):
                chunks.append(Chunk(g, samples[i:i + per], st))
        else:
            for b in samples:
                for j in range(0, st.numel(), max_rows):
                    chunks.append(Chunk(g, b.view(1), st[j:j + max_rows]))
    return chunks


@dataclass
class StepState:
    """What `accumulate_gradients` leaves for `apply_update`."""
    metrics: dict[str, float] = field(default_factory=dict)
    nonfinite_loss: bool = False
    no_signal: bool = False
    t_start: float = 0.0


class Learner:
    """Mask-GRPO learner on one data-parallel rank (see module doc). The model passed in is taken over
    (DeepSpeed may cast and, under ZeRO-3, partition it); its trained weights are in ``learner.policy``."""

    def __init__(self, model: Showo, config: LearnerConfig, reference: Optional[Showo] = None):
        import deepspeed

        dist.init_distributed()
        self.config = config
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.use_cuda() else torch.device("cpu")
        self.bf16 = dist.use_cuda() if config.bf16 is None else bool(config.bf16)
        if self.bf16 and not dist.use_cuda():
            raise ValueError("bf16 training needs CUDA; on the CPU use bf16=False (or None for auto)")
        model.gradient_checkpointing = bool(config.gradient_checkpointing)
        model.to(self.device)

        # A frozen reference exists only for a real KL term (kl_beta == 0: no reference model at all).
        self.reference: Optional[Showo] = None
        if config.kl_beta > 0:
            ref = reference if reference is not None else copy.deepcopy(model)
            ref.gradient_checkpointing = False
            self.reference = ref.to(self.device, torch.bfloat16 if self.bf16 else torch.float32).eval()
            self.reference.requires_grad_(False)
        elif reference is not None:
            raise ValueError("a reference policy was given but kl_beta == 0: it would never be used")

        self.objective = PolicyObjective(model, config.transition, config.prefix_reuse)
        if config.zero_stage == 3:
            # Show-o reads lm_head.weight/bias directly (codebook slice), outside lm_head.forward.
            head = model.showo.lm_head
            deepspeed.zero.register_external_parameter(self.objective, head.weight)
            deepspeed.zero.register_external_parameter(self.objective, head.bias)
        self._torch_optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                                  betas=config.betas, eps=config.adam_eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._torch_optimizer, WarmupCosine(config.warmup_steps, config.total_steps, config.min_lr_ratio))
        self.ds_config = deepspeed_config(config, self.bf16)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.objective, optimizer=self._torch_optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.engine.train()
        self.policy: Showo = self.engine.module.policy
        self.tracker = PromptStatTracker(config.running_buffer, config.running_min_count, config.adv_eps,
                                         config.adv_std_unbiased)
        self.step = 0                   # optimizer updates applied == weight version
        self.calls = 0                  # train_step calls (seeds random step selection)
        self.nonfinite_total = 0
        self.consecutive_nonfinite = 0
        self.last_checkpoint: Optional[str] = None
        self.driver_state: Optional[dict[str, Any]] = None   # the caller's own JSON state, kept in checkpoints

    # ----- properties -----------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The weight version: optimizer updates applied so far (rollouts record it as `policy_version`)."""
        return self.step

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ----- the training step ----------------------------------------------------------------------------------
    def train_step(self, trajectories: Sequence[Trajectory], rewards: Sequence[torch.Tensor],
                   prompts: Sequence[str], *, advantages: Optional[Sequence[torch.Tensor]] = None,
                   behaviour_logprobs: Optional[Sequence[torch.Tensor]] = None) -> dict[str, float]:
        """One optimizer update from this rank's groups (all ranks call it together).

        trajectories: one `Trajectory` per group (its G rollouts); rewards: float [G] per group; prompts: the
        group's prompt text (keys the running advantage statistics). `advantages` (float [G] per group)
        replaces the advantage computation and filtering; `behaviour_logprobs` (float [G, T] per group)
        replaces the log-probs recorded in the trajectories. Returns the step's metrics (global over ranks).
        """
        state = self.accumulate_gradients(trajectories, rewards, prompts, advantages=advantages,
                                          behaviour_logprobs=behaviour_logprobs)
        return self.apply_update(state)

    def _validate(self, trajectories, rewards, prompts, advantages, behaviour_logprobs) -> None:
        if not (len(trajectories) == len(rewards) == len(prompts)):
            raise ValueError(f"{len(trajectories)} trajectories, {len(rewards)} reward tensors and "
                             f"{len(prompts)} prompts: need one of each per group")
        for name, extra in (("advantages", advantages), ("behaviour_logprobs", behaviour_logprobs)):
            if extra is not None and len(extra) != len(trajectories):
                raise ValueError(f"{len(extra)} {name} for {len(trajectories)} groups")
        for g, tr in enumerate(trajectories):
            if behaviour_logprobs is not None and tuple(behaviour_logprobs[g].shape) != (tr.batch_size, tr.num_steps):
                raise ValueError(f"behaviour_logprobs[{g}] has shape {tuple(behaviour_logprobs[g].shape)}, "
                                 f"expected {(tr.batch_size, tr.num_steps)}")
            if advantages is not None and tuple(advantages[g].shape) != (tr.batch_size,):
                raise ValueError(f"advantages[{g}] has shape {tuple(advantages[g].shape)}, expected "
                                 f"{(tr.batch_size,)}")

    def _checked_rewards(self, trajectories, rewards, prompts, advantages, behaviour_logprobs) -> list[torch.Tensor]:
        """Validate the inputs on every rank together: a bad input on one rank raises on all of them (instead
        of leaving the others waiting in a collective)."""
        error: Optional[ValueError] = None
        rs: list[torch.Tensor] = []
        try:
            self._validate(trajectories, rewards, prompts, advantages, behaviour_logprobs)
            group_ids = [tr.meta.get("group_id", g) for g, tr in enumerate(trajectories)]
            rs = check_rewards(rewards, self.config.reward_name, group_ids, [tr.batch_size for tr in trajectories])
        except ValueError as e:
            error = e
        reports = dist.all_gather_object(None if error is None else (isinstance(error, RewardError), str(error)))
        if error is not None:
            raise error
        for r, report in enumerate(reports):
            if report is not None:
                raise (RewardError if report[0] else ValueError)(f"learner rank {r}: {report[1]}")
        return rs

    def _advantages(self, rs, prompts, advantages) -> tuple[AdvantageResult, dict[str, float]]:
        cfg = self.config
        gathered = dist.all_gather_object((list(prompts), [r.tolist() for r in rs]))
        all_prompts = [p for ps, _ in gathered for p in ps]
        all_rewards = [torch.tensor(r, dtype=torch.float64) for _, rl in gathered for r in rl]
        offset = sum(len(ps) for ps, _ in gathered[:self.rank])
        flat = torch.cat(all_rewards) if all_rewards else torch.zeros(0, dtype=torch.float64)
        mean = float(flat.mean()) if flat.numel() else float("nan")
        std = float(flat.std()) if flat.numel() > 1 else 0.0
        info = {f"{cfg.reward_name}_mean": mean, f"{cfg.reward_name}_std": std, "reward_mean": mean,
                "reward_std": std, "groups": float(len(all_prompts)), "group_offset": float(offset)}
        if advantages is not None:
            adv = [torch.as_tensor(a, dtype=torch.float32).detach().cpu() for a in advantages]
            res = AdvantageResult(adv, [torch.ones(a.numel(), dtype=torch.bool) for a in adv])
        else:
            res = compute_advantages(rs, prompts, cfg, self.tracker, history=(all_prompts, all_rewards))
        return res, info

    def accumulate_gradients(self, trajectories: Sequence[Trajectory], rewards: Sequence[torch.Tensor],
                             prompts: Sequence[str], *, advantages: Optional[Sequence[torch.Tensor]] = None,
                             behaviour_logprobs: Optional[Sequence[torch.Tensor]] = None) -> StepState:
        """Forward/backward of every micro-batch (no optimizer step); see `train_step`."""
        cfg, t0 = self.config, time.perf_counter()
        rs = self._checked_rewards(trajectories, rewards, prompts, advantages, behaviour_logprobs)
        res, info = self._advantages(rs, prompts, advantages)
        offset = int(info.pop("group_offset"))
        beh = [(behaviour_logprobs[g] if behaviour_logprobs is not None
                else tr.behaviour_step_logprob(cfg.transition)).detach().float().cpu()
               for g, tr in enumerate(trajectories)]
        steps = [select_steps(tr.num_steps, cfg, seed=hash((cfg.seed, self.calls, offset + g)))
                 for g, tr in enumerate(trajectories)]
        self.calls += 1

        # Global normaliser, so that the update equals one rank holding the whole batch.
        kept = sum(int(k.sum()) for k in res.keep)
        terms = sum(float(scored_terms(tr.select(k.nonzero().flatten()), cfg.transition, st).sum())
                    for tr, k, st in zip(trajectories, res.keep, steps) if k.any())
        stale = [float(self.version - tr.policy_version) for tr in trajectories] or [0.0]
        chunks = plan_chunks(res.keep, steps, cfg.micro_batch_rows)
        adv_abs = float(sum(a[k].abs().sum() for a, k in zip(res.advantages, res.keep)))
        (g_kept, g_terms, g_stale_sum, g_groups, g_kept_groups, g_dropped_low_std, g_dropped_samples, g_adv_abs) = \
            dist.all_reduce([kept, terms, sum(stale) if trajectories else 0.0, len(trajectories), res.kept_groups,
                             res.dropped_low_std, res.dropped_samples, adv_abs])
        n_chunks, stale_max = dist.all_reduce([len(chunks), max(stale) if trajectories else -math.inf], op="max")
        metrics = dict(info)
        metrics.update(kept_groups=g_kept_groups, dropped_groups=g_groups - g_kept_groups,
                       dropped_low_std=g_dropped_low_std, kept_samples=g_kept, dropped_samples=g_dropped_samples,
                       staleness_mean=g_stale_sum / max(g_groups, 1), staleness_max=max(stale_max, 0.0),
                       adv_abs_mean=g_adv_abs / max(g_kept, 1))
        state = StepState(metrics=metrics, t_start=t0)
        if g_kept == 0:
            state.no_signal = True
            return state
        if cfg.loss_average == "sequence":
            norm = lambda tr: 1.0 / (tr.num_steps * g_kept)          # noqa: E731
        else:
            norm = lambda tr: 1.0 / g_terms                           # noqa: E731

        # Equal backward counts on every rank (ZeRO reduces during each backward): pad with zero-weight passes
        # over a real row (or a synthetic one on a rank that received no group).
        pool = list(trajectories) if trajectories else [self._dummy_trajectory()]
        while len(chunks) < int(n_chunks):
            chunks.append(Chunk(0, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), dummy=True))
        t1 = time.perf_counter()
        sums = dict(loss=0.0, rows=0.0, clipped=0.0, ratio=0.0, approx_kl=0.0, kl=0.0)
        ratio_max, nonfinite = 0.0, False
        for i, ch in enumerate(chunks):
            self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            tr = pool[ch.group].select(ch.samples)
            logp, _ = self.engine(tr, ch.steps)
            logp = logp.float().reshape(-1)
            if ch.dummy:   # same graph, zero gradient; independent of the (possibly non-finite) data terms
                self.engine.backward(logp.sum() * 0.0)
                continue
            b_lp = beh[ch.group][ch.samples][:, ch.steps].reshape(-1).to(logp.device)
            adv = res.advantages[ch.group][ch.samples].to(logp.device).repeat_interleave(ch.steps.numel())
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref = transition_logprobs(self.reference, tr, cfg.transition, ch.steps,
                                              cfg.prefix_reuse).logprob.float().reshape(-1)
            rl = mask_grpo_row_loss(logp, b_lp, adv, cfg.clip_low, cfg.clip_high, cfg.kl_beta, ref)
            # Every row of a micro-batch has the same weight: 1/(T·M) ("sequence") or 1/(scored terms) ("token").
            loss = rl.loss.sum() * norm(tr)
            value = float(loss.detach())
            if math.isfinite(value):
                self.engine.backward(loss * self.world_size)
            else:
                # A NaN row can still give finite gradients (clamp/min mask it), so make sure the step is
                # skipped on every rank and ZeRO stage: poison the gradients; DeepSpeed's overflow check
                # (or ours for a plain optimizer) then discards the whole update.
                nonfinite = True
                self.engine.backward(logp.sum() * float("nan"))
            sums["loss"] += value
            sums["rows"] += ch.rows
            sums["clipped"] += float(rl.clipped.sum())
            sums["ratio"] += float(rl.ratio.sum())
            sums["approx_kl"] += float(rl.approx_kl.sum())
            if rl.kl is not None:
                sums["kl"] += float(rl.kl.sum())
            ratio_max = max(ratio_max, float(rl.ratio.max()))
        keys = list(sums)
        total = dict(zip(keys, dist.all_reduce([sums[k] for k in keys])))
        (ratio_max_g, nonfinite_g) = dist.all_reduce([ratio_max, float(nonfinite)], op="max")
        rows = max(total["rows"], 1.0)
        metrics.update(loss=total["loss"], rows=total["rows"], micro_batches=float(n_chunks),
                       clip_frac=total["clipped"] / rows, ratio_mean=total["ratio"] / rows, ratio_max=ratio_max_g,
                       approx_kl=total["approx_kl"] / rows, time_prepare=t1 - t0,
                       time_forward_backward=time.perf_counter() - t1)
        if self.reference is not None:
            metrics["kl"] = total["kl"] / rows
        state.nonfinite_loss = bool(nonfinite_g)
        return state

    def _dummy_trajectory(self) -> Trajectory:
        """A one-step, one-rollout trajectory with the policy's layout, for zero-weight padding passes."""
        layout = self.policy.layout
        n = layout.num_vq_tokens
        return Trajectory(text_ids=layout.empty_text_area(1), uncond_text_ids=layout.empty_text_area(1),
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

    def apply_update(self, state: StepState) -> dict[str, float]:
        """The optimizer step after `accumulate_gradients`, unless the loss or a gradient is not finite."""
        metrics = state.metrics
        t0 = time.perf_counter()
        lr = self.lr
        skipped_nonfinite = False
        if state.no_signal:
            log.info("learner step skipped: no group with reward signal (all groups filtered)")
            grad_norm = 0.0
        else:
            own_norm = self._own_grad_check()
            if own_norm is not None:
                if state.nonfinite_loss or not math.isfinite(own_norm):
                    self.engine.zero_grad()
                    skipped_nonfinite = True
                else:
                    self.engine.step()
                grad_norm = own_norm
            else:
                self.engine.step()
                skipped_nonfinite = not self.engine.was_step_applied()
                gn = self.engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None else float("nan")
                if state.nonfinite_loss and not skipped_nonfinite:
                    log.warning("non-finite loss but finite gradients: DeepSpeed applied the update")
        if skipped_nonfinite:
            self.nonfinite_total += 1
            self.consecutive_nonfinite += 1
            log.warning("learner step skipped: non-finite loss or gradient (%d in a row, %d in total)",
                        self.consecutive_nonfinite, self.nonfinite_total)
        elif not state.no_signal:
            self.consecutive_nonfinite = 0
            self.step += 1
        metrics.update(grad_norm=grad_norm, lr=lr, step=float(self.step), version=float(self.version),
                       nonfinite_skipped=float(skipped_nonfinite), nonfinite_total=float(self.nonfinite_total),
                       no_signal_skipped=float(state.no_signal), time_step=time.perf_counter() - t0,
                       time_total=time.perf_counter() - state.t_start)
        if self.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
            where = (f"the last good checkpoint {self.last_checkpoint!r} is intact"
                     if self.last_checkpoint else "no checkpoint was saved by this learner yet")
            raise NonFiniteUpdateError(
                f"{self.consecutive_nonfinite} consecutive learner steps had a NaN/inf loss or gradient and were "
                f"skipped (no update applied, parameters unchanged since step {self.step}); {where}. Check the "
                f"rewards, the recorded behaviour log-probs and the learning rate, then resume from it.")
        return metrics

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
    def iter_weight_buckets(self, bucket_bytes: int = 256 << 20,
                            dtype: Optional[torch.dtype] = None) -> Iterator[WeightBucket]:
        """The policy's full weights in buckets (rank 0 yields; every rank must exhaust the iterator)."""
        return iter_weight_buckets(self.policy, bucket_bytes, self.version, self.rank, dtype)

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """The full policy state dict on rank 0 (released key layout, CPU); {} on other ranks. Collective."""
        sd: dict[str, torch.Tensor] = {}
        for bucket in self.iter_weight_buckets():
            for name, t in bucket.to("cpu").tensors():
                sd[name] = t.clone()
        return sd

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "calls": self.calls, "nonfinite_total": self.nonfinite_total,
                "consecutive_nonfinite": self.consecutive_nonfinite, "tracker": self.tracker.state_dict(),
                "config": self.config.to_dict(), "world_size": self.world_size, "driver_state": self.driver_state}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step, self.calls = int(state["step"]), int(state["calls"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.tracker.load_state_dict(state["tracker"])
        self.driver_state = state.get("driver_state")

    def save_checkpoint(self, root: str | Path, keep_last: int = 0) -> Path:
        from .checkpoint import save_checkpoint
        return save_checkpoint(self, root, keep_last=keep_last)

    def resume(self, path: str | Path) -> Path:
        """Load a checkpoint directory, or the latest complete one under a checkpoints root."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(self, path)
