"""Sampler throughput: batched unmasking vs the reference's one-image-at-a-time loop, and text-prefix reuse.

    python -m benchmarks.bench_sampler [--sizes tiny,mid] [--prompts 2] [--group 6] [--steps 16] [--device cpu]

Random weights, seed 0. Each variant produces the same number of images with the same per-sample seeds.
"""
from __future__ import annotations

import argparse
import time

import torch

from policy.sampler import SamplerConfig, UnmaskingSampler
from policy.showo import PhiArch, Showo, ShowoConfig

SIZES = {
    # the reference vectors' tiny configuration
    "tiny": ShowoConfig(vocab_size=175, llm_vocab_size=100, codebook_size=64, num_vq_tokens=16, max_seq_length=16,
                        bos_id=99, eos_id=99, phi=PhiArch(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                          num_attention_heads=4, max_position_embeddings=256)),
    # mid-size: 8 layers, hidden 512, 256 image tokens, the real vocabulary and codebook
    "mid": ShowoConfig(num_vq_tokens=256, max_seq_length=128,
                       phi=PhiArch(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                   num_attention_heads=8)),
    # Show-o 256x256 (phi-1.5, 256 tokens) and 512x512 (1024 tokens): GPU only
    "showo256": ShowoConfig(num_vq_tokens=256, max_seq_length=128),
    "showo512": ShowoConfig(num_vq_tokens=1024, max_seq_length=128),
}


def _time(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(size: str, prompts: int, group: int, steps: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    torch.manual_seed(0)
    model = Showo(SIZES[size]).to(device=device, dtype=dtype).eval()
    layout = model.layout
    ids = layout.text_area([[(7 * i + j) % 90 for j in range(5 + 3 * i)] for i in range(prompts)])
    text = {"ids": ids}
    seeds = list(range(prompts * group))
    rows = []
    for label, batched, reuse in [("one at a time (reference-style)", False, False),
                                  ("one at a time + prefix reuse", False, True),
                                  ("batched, no prefix reuse", True, False),
                                  ("batched + prefix reuse", True, True)]:
        sampler = UnmaskingSampler(model, SamplerConfig(steps=steps, prefix_reuse=reuse))
        if batched:
            run = lambda: sampler.sample(text, seeds, group_size=group)
        else:
            run = lambda: [sampler.sample({"ids": ids[p: p + 1]}, [seeds[p * group + g]], 1)
                           for p in range(prompts) for g in range(group)]
        run()  # warm-up
        seconds = _time(run, device)
        rows.append((size, label, prompts * group, seconds, prompts * group / seconds))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# sampler benchmark on {name}, {dtype}, {args.prompts} prompts x G={args.group}, T={args.steps}, seed 0")
    print(f"{'size':9} {'variant':34} {'images':>6} {'seconds':>8} {'images/s':>9} {'speedup':>8}")
    for size in args.sizes.split(","):
        rows = bench(size, args.prompts, args.group, args.steps, device, dtype)
        base = rows[0][4]
        for s, label, n, sec, ips in rows:
            print(f"{s:9} {label:34} {n:6d} {sec:8.3f} {ips:9.2f} {ips / base:7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
