"""Precision drift: what bf16 does to the policy's logits and transition log-probs, and why the sampler and the
learner must compute in the same precision.

    python -m benchmarks.bench_precision [--sizes tiny,mid] [--steps 8] [--group 4] [--device cpu]

Random weights (seed 0). For each size, the same weights in fp32 (the reference), in bf16 with attention in bf16
(``policy.attention_precision: model``, the fast path) and in bf16 with fp32 attention (``fp32``):
- logits: max and mean |bf16 − fp32| of the codebook logits over the inputs of every step of an fp32 rollout;
- mixed precision (an fp32 sampler, a bf16 learner: what a rollout worker loaded in fp32 and a DeepSpeed bf16
  learner did before ``policy.dtype``): the importance ratio exp(logp_learner − logp_recorded) of every
  (rollout, step) row, per transition: median |r − 1| and the share of rows outside the clip range [0.9, 1.2];
- same precision (bf16 sampler, bf16 learner, the same weights): the same statistics.
"""
from __future__ import annotations

import argparse
import time

import torch

from algorithm.transitions import behaviour_logprob

from benchmarks.bench_sampler import SIZES
from algorithm.transitions import all_transition_logprobs
from policy.sampler import SamplerConfig, UnmaskingSampler
from policy.showo import Showo
from algorithm.transitions import TRANSITION_NAMES as TRANSITIONS


def ratio_stats(recorded: torch.Tensor, recomputed: torch.Tensor, low: float = 0.9, high: float = 1.2) -> tuple[float, float]:
    """(median |r − 1|, share of rows outside [low, high]) of r = exp(recomputed − recorded)."""
    r = (recomputed.double().cpu() - recorded.double().cpu()).exp().flatten()
    return float((r - 1).abs().median()), float(((r < low) | (r > high)).double().mean())


def _logits_per_step(model: Showo, traj, steps: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    tr = traj.to(device)
    codes = tr.input_codes(steps.to(device)).reshape(-1, tr.num_image_tokens)
    with torch.no_grad():
        prefix = model.encode_text(tr.condition["ids"]).repeat_interleave(steps.numel())
        return model.image_logits(prefix, codes).float()


def measure(size: str, steps: int, group: int, prompts: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    ref = Showo(SIZES[size]).to(device).eval()
    layout = ref.layout
    text = {"ids": layout.text_area([[(7 * i + j) % 90 + 1 for j in range(3 + 2 * i)] for i in range(prompts)])}
    seeds = list(range(prompts * group))
    sampler_cfg = SamplerConfig(steps=steps)
    t0 = time.perf_counter()
    traj32 = UnmaskingSampler(ref, sampler_cfg).sample(text, seeds, group_size=group)
    all_steps = torch.arange(steps)
    logits32 = _logits_per_step(ref, traj32, all_steps)
    out: dict = {"size": size, "params_M": sum(p.numel() for p in ref.parameters()) / 1e6}

    low = Showo(SIZES[size]).to(device).eval()
    low.load_state_dict(ref.state_dict())
    low.to(torch.bfloat16)
    for precision in ("model", "fp32"):
        low.attention_precision = precision
        diff = (_logits_per_step(low, traj32, all_steps) - logits32).abs()
        out[f"logit_max_{precision}"] = float(diff.max())
        out[f"logit_mean_{precision}"] = float(diff.mean())
    out["logit_std"] = float(logits32.std())

    low.attention_precision = "model"
    with torch.no_grad():
        mixed = all_transition_logprobs(low, traj32)                        # bf16 learner, fp32 sampler
        traj16 = UnmaskingSampler(low, sampler_cfg).sample(text, seeds, group_size=group)
        same = all_transition_logprobs(low, traj16)                         # bf16 learner, bf16 sampler
    for t in TRANSITIONS:
        out[f"mixed_{t}"] = ratio_stats(behaviour_logprob(traj32, t), mixed[t].logprob)
        out[f"same_{t}"] = ratio_stats(behaviour_logprob(traj16, t), same[t].logprob)
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"# precision drift on {device} ({torch.get_num_threads()} threads), {args.prompts} prompts x "
          f"G={args.group}, T={args.steps}, random weights seed 0; ratio r = exp(logp_learner - logp_recorded)")
    for size in args.sizes.split(","):
        r = measure(size, args.steps, args.group, args.prompts, device)
        print(f"\n## {size} ({r['params_M']:.1f} M parameters, {r['seconds']:.0f} s)")
        print(f"codebook logits, |bf16 - fp32| (fp32 logit std {r['logit_std']:.3f}): "
              f"attention in bf16: max {r['logit_max_model']:.4f}, mean {r['logit_mean_model']:.5f}; "
              f"attention in fp32: max {r['logit_max_fp32']:.4f}, mean {r['logit_mean_fp32']:.5f}")
        print(f"{'transition':11} {'fp32 sampler, bf16 learner':>34} {'bf16 sampler, bf16 learner':>34}")
        print(f"{'':11} {'median |r-1|':>17} {'outside clip':>16} {'median |r-1|':>17} {'outside clip':>16}")
        for t in TRANSITIONS:
            (m1, o1), (m2, o2) = r[f"mixed_{t}"], r[f"same_{t}"]
            print(f"{t:11} {m1:17.2e} {o1:16.1%} {m2:17.2e} {o2:16.1%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
