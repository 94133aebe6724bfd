"""The GPU check: one process, one command, a policy family's real shapes with random weights, every stage of a
training step, correctness asserted and throughput printed.

    python -m benchmarks.gpu_check                       # Show-o-512 shapes on the GPU (about 3 min on an H100/H200)
    python -m benchmarks.gpu_check --family meissonic    # Meissonic-1024's shapes (the ~1 B transformer)
    python -m benchmarks.gpu_check --tiny                # the same checks on a tiny model (CI runs it on the CPU)
    python -m benchmarks.gpu_check --tiny --family meissonic
    bash scripts/gpu_check.sh [ARGS]                     # with the carried wheels installed first (see the README)

Stages (no Ray: it is never imported; the product's step runs on the local backend):
  1. sampler: the rollout copy of the policy (``policy.dtype``: bf16 on CUDA) samples G=16 images, T=50 steps;
  2. reward: a cheap reward read from the codes (mean code / codebook size; no reward model, random weights);
  3. learner (`learner.engine.Learner`, DeepSpeed, one rank, ZeRO 2, bf16 on CUDA): before any update, the
     behaviour log-probs the sampler recorded are recomputed with the learner's (identical) weights for all three
     transitions: median |ratio − 1| and the share of rows outside the clip range [0.9, 1.2] must stay at the
     same-precision level (≤ 1e-3, ≤ 1 %); then one update with all 50 steps trained (timed);
  4. weight export + apply to the rollout copy (device buckets, device-to-device copies; timed), after which the
     rollout copy must equal the learner's weights exactly;
  5. one training step end to end, the product's own: `cluster.driver.Trainer.train_step` with
     ``cluster.backend=local`` (sample, score with the shapes world's GenEval rules, the driver's plan, an update
     on 25 steps chosen with ``random_k``, the learner group's hand-over; the second of two steps timed), then the
     rollout copy must equal the learner's weights and a fresh rollout passes the ratio check (the hand-over too);
  6. learner with ZeRO 0 and a KL term (the reference policy's path): one update, finite loss, weights change,
     hand-over exact.
Figures: images/s and the share of the GPU's bf16 peak, model FLOPs counted analytically (2·matmul-params·tokens
forward, ×3 forward+backward; attention-score FLOPs, about 9 % more at 1024 image tokens, are left out, so the
shares are conservative). Exit status 0 iff every check passed; ``--json`` also writes every figure.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from algorithm.transitions import behaviour_logprob

from policy.files import atomic_write_text

# Nominal dense bf16 peak by device name (FLOP/s). H200: the ~790 TFLOP/s that an 8192^3 bf16 matmul reaches
# here; H100 SXM: the data-sheet dense figure. `--peak-flops` overrides; the measured matmul rate is printed too.
PEAK_FLOPS = {"H200": 790e12, "H100": 990e12}
TARGETS = {"sampler_img_s": 2.5, "learner_img_s": 0.8, "e2e_img_s": 0.8, "export_apply_s": 0.1}
RATIO_MEDIAN_MAX, RATIO_OUTSIDE_MAX = 1e-3, 0.01
CLIP = (0.9, 1.2)


@dataclass
class Report:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    json_path: Optional[str] = None

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, bool(ok), detail))
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
        return bool(ok)

    def stage(self, title: str) -> None:
        self.save()
        print(f"\n== {title}  (t = {time.perf_counter() - self.t0:.0f} s)", flush=True)

    def save(self) -> None:
        """Write what is known so far (after every stage: a run cut off by its time limit leaves its figures)."""
        if self.json_path:
            report = {"ok": self.ok, "checks": self.checks, "figures": self.figures,
                      "seconds": time.perf_counter() - self.t0}
            atomic_write_text(self.json_path, json.dumps(report, indent=1, default=str))

    def guarded(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one stage; an exception fails the stage (with its traceback) and the check goes on."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a one-shot device run should report everything it can
            traceback.print_exc()
            self.check(f"{name} ran", False, f"{type(e).__name__}: {e}")
            return None

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


# ----- sizes and FLOPs -------------------------------------------------------------------------------------------
SIZES = {"showo": ("showo512", "showo256", "tiny"), "meissonic": ("meissonic1024", "tiny")}


def model_config(size: str, family: str = "showo"):
    """The check's `PolicyConfig` (random weights) for a family and size."""
    from policy.factory import PolicyConfig
    if family == "meissonic":
        if size == "tiny":       # the reference vectors' tiny model (configs/tiny_meissonic.yaml)
            from cluster.config import load_config, section
            return section(load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_meissonic.yaml"),
                           "policy")
        if size == "meissonic1024":     # the release: 14 dual + 28 single blocks of 1024, 64x64 codes -> 32x32
            return PolicyConfig(family="meissonic")
        raise ValueError(f"unknown Meissonic size {size!r}")
    from benchmarks.tiny_models import tiny_showo_config
    from policy.showo import ShowoConfig
    if size == "tiny":
        arch = tiny_showo_config(hidden=64, layers=2, heads=4, num_vq_tokens=16, codebook_size=64)
    elif size == "showo256":
        arch = ShowoConfig(num_vq_tokens=256, max_seq_length=128)
    elif size == "showo512":
        arch = ShowoConfig(num_vq_tokens=1024, max_seq_length=128)      # phi-1.5: hidden 2048, 24 layers, 32 heads
    else:
        raise ValueError(f"unknown size {size!r}")
    return PolicyConfig(family="showo", arch=arch)


def describe(pcfg) -> str:
    a = pcfg.arch
    if pcfg.family == "meissonic":
        t = a.transformer
        return (f"{t.num_layers} dual + {t.num_single_layers} single blocks of {t.inner_dim}, {a.num_tokens} codes"
                f"{' (halved grid)' if t.downsample else ''}, codebook {t.codebook_size}")
    return (f"hidden {a.phi.hidden_size}, {a.phi.num_hidden_layers} layers, {a.num_vq_tokens} image tokens, "
            f"vocab {a.vocab_size}")


def forward_flops_per_row(pcfg) -> tuple[float, float]:
    """(forward FLOPs of one (rollout, step) row, of what a prompt adds once per rollout call): 2 · matmul
    parameters · tokens. Show-o: the image block (the text prefix is computed once per prompt); Meissonic: the
    whole [text, image] sequence through every block at every step (no prefix reuse), the MLM head at every
    code."""
    a = pcfg.arch
    if pcfg.family == "meissonic":
        t = a.transformer
        d = t.inner_dim
        tokens = a.num_tokens // (4 if t.downsample else 1) + a.text_length
        per_token = t.num_layers * (4 * d * d + 8 * d * d) + t.num_single_layers * (3 * d * d + 4 * d * d + 5 * d * d)
        return 2.0 * (per_token * tokens + (d * d + d * t.codebook_size) * a.num_tokens), 0.0
    h, i, layers = a.phi.hidden_size, a.phi.intermediate_size, a.phi.num_hidden_layers
    per_token = layers * (4 * h * h + 2 * h * i)
    n = a.num_vq_tokens
    return 2.0 * (per_token * (n + 2) + a.codebook_size * h * n), 2.0 * per_token * (a.max_seq_length + 1)


def peak_flops(device: torch.device, override: Optional[float]) -> tuple[Optional[float], str]:
    if override:
        return override, "--peak-flops"
    if device.type != "cuda":
        return None, "CPU: no bf16 peak"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value, f"{key} nominal"
    return None, f"unknown for {name!r} (pass --peak-flops)"


def measured_matmul_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0)


# ----- helpers ------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def code_reward(traj, codebook_size: int) -> torch.Tensor:
    """A cheap reward that needs no model: the mean code of each image over the codebook size (in [0, 1))."""
    return traj.final_codes.float().mean(1) / codebook_size


def build_model(pcfg, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The family's model with default-initialised random weights, built on `device` (fast at full size); the same
    seed on the same device gives the same weights."""
    from dataclasses import replace
    from policy.factory import build_model as build
    with torch.device(device):
        model = build(replace(pcfg, init="random", init_seed=seed))
    return model.to(dtype)


def condition(pcfg, model, device: torch.device, dtype: torch.dtype, prompts: list[str]):
    """The prompts' condition and the null condition, by the family's conditioner (Meissonic: a random text
    encoder of the release's sizes on the device)."""
    from policy.family import family
    conditioner = family(pcfg.family).build_conditioner(pcfg, model, device, dtype)
    with torch.no_grad():
        return conditioner(prompts), conditioner.null()


def ratio_check(report: Report, label: str, model, traj, step_chunk: int) -> dict[str, tuple[float, float]]:
    """Recorded behaviour log-probs vs the model's recomputation (no grad) for all three transitions: one forward
    per rollout and chunk of steps gives all three."""
    from algorithm.transitions import all_transition_logprobs
    from algorithm.transitions import TRANSITION_NAMES as TRANSITIONS
    grid = {t: torch.empty(traj.batch_size, traj.num_steps) for t in TRANSITIONS}
    with torch.no_grad():
        for a in range(0, traj.num_steps, step_chunk):
            steps = torch.arange(a, min(traj.num_steps, a + step_chunk))
            for b in range(traj.batch_size):
                out = all_transition_logprobs(model, traj.select(slice(b, b + 1)), steps)
                for t in TRANSITIONS:
                    grid[t][b, steps] = out[t].logprob[0].float().cpu()
    stats = {}
    for t in TRANSITIONS:
        ratio = (grid[t].double() - behaviour_logprob(traj, t).double()).exp()
        median = float((ratio - 1).abs().median())
        outside = float(((ratio < CLIP[0]) | (ratio > CLIP[1])).double().mean())
        stats[t] = (median, outside)
        report.check(f"{label}: {t} recorded vs recomputed log-probs",
                     median <= RATIO_MEDIAN_MAX and outside <= RATIO_OUTSIDE_MAX,
                     f"median |r-1| {median:.2e} (<= {RATIO_MEDIAN_MAX:g}), outside {list(CLIP)} {outside:.2%} "
                     f"(<= {RATIO_OUTSIDE_MAX:.0%}), max |r-1| {float((ratio - 1).abs().max()):.2e}")
    return stats


def params_equal(a, b) -> tuple[bool, str]:
    bad = [n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters())
           if p.shape != q.shape or not torch.equal(p.detach().to(q.dtype), q.detach())]
    count = sum(1 for _ in a.parameters())
    return not bad, f"{count - len(bad)}/{count} parameter tensors identical" + (f"; first differing: {bad[0]}"
                                                                                  if bad else "")


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def changed_share(model, before: list[torch.Tensor]) -> float:
    changed = sum(int(not torch.equal(p.detach(), q)) for p, q in zip(model.parameters(), before))
    return changed / max(1, len(before))


def hand_over(learner, rollout, bucket_bytes: int) -> None:
    from learner.weights_export import apply_weight_bucket
    dtype = next(rollout.parameters()).dtype
    for bucket in learner.iter_weight_buckets(bucket_bytes, dtype):
        apply_weight_bucket(rollout, bucket)


def param_sums(model) -> list[float]:
    """Per-parameter float64 sums: equal lists mean the copies agree (bit-identical copies give equal sums)."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).tolist()


def _ipc_child(size: str, family: str, dtype_name: str, inbox, outbox) -> None:
    """Another process on the same GPU (as a rollout worker placed beside the learner): open the learner's CUDA
    IPC handles, copy them into its own copy of the policy, and report what it holds."""
    try:
        from actors.weight_sync import open_bucket
        from learner.weights_export import apply_weight_bucket
        model = build_model(model_config(size, family), torch.device("cuda"), getattr(torch, dtype_name), seed=99)
        shared = inbox.get(timeout=300)
        t0 = time.perf_counter()
        for bucket in shared:
            apply_weight_bucket(model, open_bucket(bucket))
        torch.cuda.synchronize()
        outbox.put((param_sums(model), time.perf_counter() - t0, None))
    except Exception as e:              # reported by the parent
        outbox.put((None, 0.0, f"{type(e).__name__}: {e}"))


def ipc_check(report: "Report", learner, rollout, size: str, family: str, bucket_bytes: int) -> None:
    """The one-GPU placement's weight path: CUDA IPC handles to the learner's buckets, opened by another process
    on the same GPU (actors.weight_sync.share_buckets / open_bucket), no copy through host memory."""
    import torch.multiprocessing as mp
    from actors.weight_sync import share_buckets
    dtype = next(rollout.parameters()).dtype
    t0 = time.perf_counter()
    shared, keep = share_buckets(learner.iter_weight_buckets(bucket_bytes, dtype))
    t_share = time.perf_counter() - t0
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=(size, family, str(dtype).removeprefix("torch."), inbox, outbox))
    child.start()
    inbox.put(shared)
    sums, t_apply, error = outbox.get(timeout=600)
    child.join(timeout=60)
    del keep
    if error:
        report.check("CUDA IPC: another process on this GPU receives the weights", False, error)
        return
    print(f"  handles {t_share:.3f} s, the other process copied every bucket in {t_apply:.3f} s")
    report.figures.update(ipc_share_seconds=t_share, ipc_apply_seconds=t_apply)
    report.check("CUDA IPC: the other process holds exactly the learner's weights", sums == param_sums(rollout),
                 f"{sum(a == b for a, b in zip(sums, param_sums(rollout)))}/{len(sums)} parameter sums equal")


def share(flops: float, seconds: float, peak: Optional[float]) -> str:
    rate = flops / seconds
    return f"{rate / 1e12:.1f} TFLOP/s" + (f" = {rate / peak:.1%} of peak" if peak else "")


def target(name: str, value: float, size: str) -> str:
    if size not in ("showo512",):
        return "(targets apply to Show-o-512 on one H100/H200)" if size != "meissonic1024" else "(no target set)"
    goal = TARGETS[name]
    ok = value <= goal if name.endswith("_s") and not name.endswith("img_s") else value >= goal
    sign = "<=" if name == "export_apply_s" else ">="
    return f"target {sign} {goal:g}: {'meets' if ok else 'BELOW TARGET'}"


def e2e_config(args, pcfg, device: torch.device, zero_stage: int, output_dir: str):
    """The run config of the end-to-end stage: the check's model, G, T and learner settings on the local backend,
    prompts and rewards from the shapes world (its exact decoder and GenEval rules; codes outside the world's
    codebook decode as background)."""
    from omegaconf import OmegaConf
    from cluster.config import load_config
    arch = pcfg.arch
    grid = int(round(math.sqrt(build_model_tokens(pcfg))))
    gpus = 1.0 if device.type == "cuda" else 0.0
    overrides = OmegaConf.create({
        "output_dir": output_dir, "seed": 0, "max_steps": 2, "device": device.type,
        "policy": {"family": pcfg.family, "init": "random", "arch": arch.to_dict(), "dtype": args.dtype,
                   "tokenizer": {"kind": "words"}, "decoder": {"kind": "shapes"}},
        "world": {"grid_size": grid, "image_size": grid * 8},
        "sampler": {"steps": args.steps},
        "algorithm": {"transition": args.transition, "selector": "random_k", "select_k": args.k},
        "learner": {"lr": args.lr, "warmup_steps": 1, "total_steps": 100, "zero_stage": zero_stage,
                    "micro_batch_rows": args.micro_batch_rows, "gradient_checkpointing": None,
                    "lora": {"rank": args.lora_rank, "alpha": 2.0 * max(args.lora_rank, 1)}},
        "data": {"prompts_per_step": 1, "group_size": args.group},
        "cluster": {"backend": "local", "rollout_gpus": gpus, "learner_gpus": gpus, "reward_gpus": gpus,
                    "weight_bucket_mb": max(1, args.bucket_bytes >> 20)},
        "eval": {"at_start": False}, "logging": {"progress": False}})
    return load_config(None, [f"{k}={v}" for k, v in _dotlist(OmegaConf.to_container(overrides))])


def _dotlist(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _dotlist(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", "null" if v is None else v


def build_model_tokens(pcfg) -> int:
    """Image codes per sample of a policy config."""
    return pcfg.arch.num_tokens if pcfg.family == "meissonic" else pcfg.arch.num_vq_tokens


def end_to_end(report: "Report", args, pcfg, device: torch.device, zero_stage: int, sampler_flops: float,
               fwd_row: float, fwd_prefix: float, peak: Optional[float]) -> None:
    """Two training steps of `cluster.driver.Trainer` (the first warms up), the second timed; then the rollout
    copy must equal the learner's weights and a fresh rollout's log-probs must match the learner's."""
    import tempfile
    from cluster.driver import Trainer
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(e2e_config(args, pcfg, device, zero_stage, out))
        try:
            trainer.sync_weights()
            trainer.train_step()
            rec, total = timed(device, lambda: trainer.train_step().to_json())
            parts = [rec[k] for k in ("rollout_seconds", "reward_seconds", "learner_seconds", "sync_seconds")]
            rows, mbs = rec["learner/rows"], rec["learner/micro_batches"]
            e2e_flops = sampler_flops + 3 * (rows * fwd_row + mbs * fwd_prefix)
            eips = rec["groups"] * args.group / total
            print(f"  sample {parts[0]:.2f} s + score {parts[1]:.3f} s + update {parts[2]:.2f} s ({int(rows)} rows) + "
                  f"hand over {parts[3]:.3f} s ({rec['sync_path']}); step {total:.2f} s: {eips:.2f} images/s, "
                  f"{share(e2e_flops, total, peak)}; {target('e2e_img_s', eips, args.size)}")
            print(f"  learner's own on-policy ratio: median |r-1| {rec['learner/on_policy_ratio_dev']:.2e}, max "
                  f"{rec['learner/ratio_max']:.6f}, rows outside [0.9, 1.2] {rec['learner/on_policy_outside_clip']:.2%}")
            report.figures.update(e2e_seconds=total, e2e_img_s=eips, e2e_parts=parts, e2e_metrics=rec)
            report.check("end to end: finite loss, update applied, on-policy rows outside the clip <= 1 %",
                         math.isfinite(rec["loss"]) and rec["learner/nonfinite_skipped"] == 0
                         and rec["learner/on_policy_outside_clip"] <= 0.01,
                         f"loss {rec['loss']:.4g}, outside {rec['learner/on_policy_outside_clip']:.2%}")
            learner = trainer.backend.obj(trainer.learner.ranks[0]).learner
            worker = trainer.backend.obj(next(iter(trainer.fleet.workers.values())))
            ok, detail = params_equal(learner.policy, worker.model)
            report.check("end to end: rollout copy equals the learner's weights after the hand-over", ok, detail)
            fresh = worker.rollout(trainer._requests(trainer.step))[1]
            report.figures["ratio_after_hand_over"] = ratio_check(report, "after the hand-over", learner.policy,
                                                                  fresh, 25)
        finally:
            trainer.shutdown()


# ----- the check -----------------------------------------------------------------------------------------------------
def run(args) -> Report:
    report = Report(json_path=args.json)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    from learner.dist import free_port
    # one rank of its own, whatever the environment says (e.g. a parent process's MASTER_PORT)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    from algorithm.config import AlgorithmConfig
    from learner.config import LearnerConfig
    from learner.engine import Learner
    from learner.update import GroupUpdate
    from dataclasses import replace
    from policy.factory import compute_dtype, learner_bf16
    from policy.sampler import SamplerConfig, UnmaskingSampler

    pcfg = replace(model_config(args.size, args.family), dtype=args.dtype)
    dtype = compute_dtype(pcfg.dtype, device)
    bf16 = learner_bf16(pcfg, device)
    steps, group = args.steps, args.group
    fwd_row, fwd_prefix = forward_flops_per_row(pcfg)
    peak, peak_src = peak_flops(device, args.peak_flops)
    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except ImportError as e:               # the learner stages will fail and say so; the sampler still runs
        ds_version = f"NOT IMPORTABLE ({e}: carry its wheels, see scripts/gpu_check.sh)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"# gpu_check: {name}; torch {torch.__version__}, deepspeed {ds_version}; {args.family} size {args.size} "
          f"({describe(pcfg)}); policy dtype {dtype}, learner bf16 {bf16}; G={group}, T={steps}")
    print(f"# bf16 peak: {peak / 1e12:.0f} TFLOP/s ({peak_src})" if peak else f"# bf16 peak: {peak_src}")
    matmul = measured_matmul_flops(device)
    if matmul:
        print(f"# measured 8192^3 bf16 matmul: {matmul / 1e12:.0f} TFLOP/s")
    report.figures.update(device=name, family=args.family, size=args.size, dtype=str(dtype), peak_flops=peak,
                          matmul_flops=matmul)

    rollout = build_model(pcfg, device, dtype).eval().requires_grad_(False)
    text, null = condition(pcfg, rollout, device, dtype, ["a photo of a red circle left of a blue square"])
    n_params = sum(p.numel() for p in rollout.parameters())
    print(f"# {n_params / 1e6:.1f} M parameters; forward FLOPs per (rollout, step) row {fwd_row / 1e9:.1f} G")

    # 1-2. sampler + reward ------------------------------------------------------------------------------------
    report.stage(f"sampler: {group} images x {steps} steps")
    UnmaskingSampler(rollout, SamplerConfig(steps=2)).sample(text, list(range(group)), group, null)    # warm-up
    sampler = UnmaskingSampler(rollout, SamplerConfig(steps=steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    traj, t_sample = timed(device, lambda: sampler.sample(text, list(range(group)), group, null))
    sampler_flops = steps * group * fwd_row + fwd_prefix
    ips = group / t_sample
    print(f"  {t_sample:.2f} s, {ips:.2f} images/s, {share(sampler_flops, t_sample, peak)}; "
          f"{target('sampler_img_s', ips, args.size)}")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    report.figures.update(sampler_seconds=t_sample, sampler_img_s=ips, sampler_flops=sampler_flops)
    rewards = code_reward(traj, rollout.codebook_size)
    report.check("sampler: every position committed, finite log-probs",
                 bool((traj.unmask_step < steps).all()) and bool(torch.isfinite(traj.token_logprob).all()))

    def update(learner, trajectory, group_rewards, step: int, k: Optional[int] = None) -> dict[str, Any]:
        """The learner alone on one group: group-normalised rewards as advantages, every step trained, or `k`
        random ones (the driver's planning runs in the end-to-end stage, in the product's step)."""
        adv = (group_rewards - group_rewards.mean()) / (group_rewards.std() + 1e-4)
        steps = torch.arange(trajectory.num_steps)
        if k is not None:
            gen = torch.Generator().manual_seed(step)
            steps = torch.randperm(trajectory.num_steps, generator=gen)[:k].sort().values
        group = GroupUpdate.rectangle(trajectory, adv.float().cpu(), torch.ones(trajectory.batch_size,
                                                                                dtype=torch.bool), steps,
                                      trajectory.num_steps)
        return learner.train_step([group]).metrics()

    # 3-5. learner ZeRO 2 -----------------------------------------------------------------------------------------
    stages = [int(z) for z in args.zero.split(",") if z != ""]
    micro_batches = dict(micro_batch_rows=args.micro_batch_rows, gradient_checkpointing=None)   # 0, None: auto
    first = stages[0] if stages else None
    if first is not None:
        report.stage(f"learner: DeepSpeed ZeRO {first}, bf16 {bf16}")

        def main_learner():
            lcfg = LearnerConfig(lr=args.lr, warmup_steps=1, total_steps=100, zero_stage=first, bf16=bf16,
                                 **micro_batches)
            learner = Learner(build_model(pcfg, device, torch.float32), lcfg,
                              AlgorithmConfig(transition=args.transition), device=device)
            ok, detail = params_equal(learner.policy, rollout)
            report.check("learner and rollout copy start from the same weights", ok, detail)
            report.figures["ratio_before_update"] = ratio_check(report, "same weights, before any update",
                                                                learner.policy, traj, 25)

            # warm-up: two rows of one rollout (ZeRO's gradient buffers, cuBLAS handles, the optimizer state); the
            # learner sizes its micro-batches from the free memory before it and once more after it
            learner.train_step([GroupUpdate.rectangle(traj.select(slice(0, 1)), torch.tensor([1.0]),
                                                      torch.ones(1, dtype=torch.bool), torch.arange(2), steps)])
            before = snapshot(learner.policy)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            metrics, t_learn = timed(device, lambda: update(learner, traj, rewards, 0))
            print(f"  learner's plan: {learner.micro_batch_plan}")
            report.figures["micro_batch_plan"] = str(learner.micro_batch_plan)
            rows = metrics["rows"]
            learner_flops = 3 * (rows * fwd_row + metrics["micro_batches"] * fwd_prefix)
            lips = group / t_learn
            print(f"  all {steps} steps trained: {int(rows)} rows in {int(metrics['micro_batches'])} micro-batches, "
                  f"{t_learn:.2f} s, {lips:.2f} images/s, {share(learner_flops, t_learn, peak)}; "
                  f"{target('learner_img_s', lips, args.size)}")
            if device.type == "cuda":
                print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
            report.figures.update(learner_seconds=t_learn, learner_img_s=lips, learner_rows=rows,
                                  learner_flops=learner_flops, learner_metrics=metrics)
            report.check("learner: finite loss, update applied",
                         math.isfinite(metrics["loss"]) and metrics["nonfinite_skipped"] == 0
                         and metrics["no_signal_skipped"] == 0, f"loss {metrics['loss']:.4g}, grad norm "
                         f"{metrics['grad_norm']:.3g}")
            moved = changed_share(learner.policy, before)
            report.check("learner: the weights changed", moved >= 0.5, f"{moved:.0%} of parameter tensors")
            del before

            report.stage("weight export + apply to the rollout copy")
            hand_over(learner, rollout, args.bucket_bytes)                       # warm-up (allocator)
            _, t_sync = timed(device, lambda: hand_over(learner, rollout, args.bucket_bytes))
            print(f"  {t_sync:.3f} s for {n_params * torch.finfo(dtype).bits / 8 / 2**30:.2f} GiB in "
                  f"{args.bucket_bytes >> 20} MiB buckets; {target('export_apply_s', t_sync, args.size)}")
            report.figures["export_apply_seconds"] = t_sync
            ok, detail = params_equal(learner.policy, rollout)
            report.check("rollout copy equals the learner's weights after apply", ok, detail)

            if device.type == "cuda":
                report.stage("weights to another process on the same GPU through CUDA IPC (configs/one_gpu.yaml)")
                ipc_check(report, learner, rollout, args.size, args.family, args.bucket_bytes)

        report.guarded(f"learner ZeRO {first}", main_learner)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 5. the product's training step, local backend --------------------------------------------------------------
    if first is not None:
        report.stage(f"one training step end to end: the product's Trainer.train_step on the local backend (sample, "
                     f"score, update {args.k} random_k steps, hand over)")
        report.guarded("end to end", lambda: end_to_end(report, args, pcfg, device, first, sampler_flops, fwd_row,
                                                        fwd_prefix, peak))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 6. other ZeRO stages, with a KL term (the reference policy's path) ------------------------------------------
    for stage in stages[1:]:
        if time.perf_counter() - report.t0 > args.budget_s:
            report.check(f"learner ZeRO {stage} + KL", True, f"skipped: past the {args.budget_s:.0f} s budget")
            continue
        report.stage(f"learner: DeepSpeed ZeRO {stage}, bf16 {bf16}, KL to a frozen reference (beta 0.01)")

        def other_learner(stage=stage):
            lcfg = LearnerConfig(lr=args.lr, warmup_steps=1, total_steps=100, zero_stage=stage, bf16=bf16,
                                 **micro_batches)
            learner = Learner(build_model(pcfg, device, torch.float32), lcfg,
                              AlgorithmConfig(transition=args.transition, kl_beta=0.01), device=device)
            # no warm-up here: the learner's first plan keeps room for the optimizer state (learner.memory)
            fresh = build_model(pcfg, device, dtype).eval().requires_grad_(False)
            before = snapshot(learner.policy)
            m, t = timed(device, lambda: update(learner, traj, rewards, 0, args.k))
            print(f"  {int(m['rows'])} rows in {t:.2f} s ({group / t:.2f} images/s with the reference forward)")
            report.check(f"ZeRO {stage} + KL: finite loss and KL, update applied",
                         math.isfinite(m["loss"]) and math.isfinite(m.get("kl", float("nan"))) and m["kl"] >= 0
                         and m["nonfinite_skipped"] == 0, f"loss {m['loss']:.4g}, kl {m.get('kl', float('nan')):.3g}")
            moved = changed_share(learner.policy, before)
            report.check(f"ZeRO {stage} + KL: the weights changed", moved >= 0.5, f"{moved:.0%} of parameter tensors")
            hand_over(learner, fresh, args.bucket_bytes)
            ok, detail = params_equal(learner.policy, fresh)
            report.check(f"ZeRO {stage} + KL: a rollout copy equals the learner's weights after apply", ok, detail)
            report.figures[f"zero{stage}_kl_seconds"] = t

        report.guarded(f"learner ZeRO {stage} + KL", other_learner)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    blocked = sorted(m for m in sys.modules if m.split(".")[0] == "ray" and sys.modules[m] is not None)
    report.check("no Ray imported (the local backend)", not blocked, ", ".join(blocked[:5]))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="showo", choices=sorted(SIZES), help="the policy family (policy.family)")
    ap.add_argument("--size", default=None, choices=sorted({s for sizes in SIZES.values() for s in sizes}),
                    help="model shapes (default: showo512, meissonic1024; --tiny for the tiny model)")
    ap.add_argument("--tiny", action="store_true", help="= --size tiny (the CPU/CI run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="policy.dtype")
    ap.add_argument("--group", type=int, default=None, help="G (default 16; tiny 4)")
    ap.add_argument("--steps", type=int, default=None, help="T (default 50; tiny 6)")
    ap.add_argument("--k", type=int, default=None, help="random_k steps of the end-to-end update (default T/2)")
    ap.add_argument("--zero", default="2,0", help="ZeRO stages: the first runs stages 3-5, the others 6")
    ap.add_argument("--transition", default="candidate1", choices=["candidate1", "candidate2", "ar_style"])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--micro-batch-rows", type=int, default=0,
                    help="default 0: from free GPU memory, as learner.micro_batch_rows=0 (checkpointing: auto)")
    ap.add_argument("--bucket-bytes", type=int, default=256 << 20)
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="the end-to-end stage with LoRA adapters of this rank (alpha = 2 x rank; 0: full fine-tuning)")
    ap.add_argument("--peak-flops", type=float, default=None, help="bf16 peak FLOP/s (default by device name)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip the extra ZeRO stages after this long")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for --tiny on the CPU)")
    ap.add_argument("--json", default=None, help="also write the figures and checks here")
    args = ap.parse_args(argv)
    args.size = "tiny" if args.tiny else (args.size or SIZES[args.family][0])
    if args.size not in SIZES[args.family]:
        ap.error(f"--size {args.size} is not a {args.family} size: choose one of {SIZES[args.family]}")
    tiny = args.size == "tiny"
    args.group = args.group or (4 if tiny else 16)
    args.steps = args.steps or (6 if tiny else 50)
    args.k = args.k or max(1, args.steps // 2)
    threads = args.threads or (1 if tiny and args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)      # a tiny model on a shared CPU: more threads only spin
    report = run(args)
    print(f"\n== {'ALL CHECKS PASSED' if report.ok else 'CHECKS FAILED'} "
          f"({sum(ok for _, ok, _ in report.checks)}/{len(report.checks)}), "
          f"{time.perf_counter() - report.t0:.0f} s")
    for name, ok, detail in report.checks:
        if not ok:
            print(f"  FAILED: {name}: {detail}")
    report.save()
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
