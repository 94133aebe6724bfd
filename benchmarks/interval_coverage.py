"""How often the evaluation's 95 % interval holds the true mean (docs/evaluation.md, "The interval").

A held-out set is simulated as a benchmark would be drawn: each prompt has its own success rate p_i (Beta(a, b):
some prompts easy, some hard), each of its k images is correct with probability p_i. The quantity to estimate is
the mean of p over the population of prompts. For each of `--reps` simulated evaluations it computes

* the evaluation's interval (`cluster.intervals.mean_interval`: a bootstrap over prompts, percentile), and
* the interval that treats every image as independent (binomial, normal approximation over n·k images),

and reports how often each holds the true mean. Scores that are not 0/1 (a preference reward) behave the same
way: what matters is that images of one prompt share the prompt.

    python -m benchmarks.interval_coverage --prompts 32 --images 16 --reps 1000
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cluster.intervals import mean_interval


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--images", type=int, default=16, help="images per prompt")
    ap.add_argument("--alpha", type=float, default=1.0, help="Beta(alpha, beta) of the prompts' success rates")
    ap.add_argument("--beta", type=float, default=1.5)
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    truth = args.alpha / (args.alpha + args.beta)
    hit_boot = hit_naive = 0
    widths_boot, widths_naive = [], []
    t0 = time.perf_counter()
    for _ in range(args.reps):
        p = rng.beta(args.alpha, args.beta, size=args.prompts)
        correct = rng.random((args.prompts, args.images)) < p[:, None]
        per_prompt = correct.mean(1)
        lo, hi = mean_interval(per_prompt, ["all"] * args.prompts)["ci95"]
        hit_boot += lo <= truth <= hi
        widths_boot.append(hi - lo)
        m, n = correct.mean(), correct.size
        half = 1.96 * np.sqrt(m * (1 - m) / n)
        hit_naive += m - half <= truth <= m + half
        widths_naive.append(2 * half)
    seconds = (time.perf_counter() - t0) / args.reps
    print(f"{args.prompts} prompts x {args.images} images, p ~ Beta({args.alpha:g}, {args.beta:g}) (true mean "
          f"{truth:.3f}), {args.reps} evaluations, seed {args.seed}")
    print(f"{'interval':<40}{'coverage':>10}{'mean width':>12}")
    print(f"{'bootstrap over prompts (the evaluation)':<40}{hit_boot / args.reps:>10.3f}{np.mean(widths_boot):>12.3f}")
    print(f"{'images as independent (binomial)':<40}{hit_naive / args.reps:>10.3f}{np.mean(widths_naive):>12.3f}")
    print(f"{seconds * 1000:.1f} ms per evaluation (both intervals)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
