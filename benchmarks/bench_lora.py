"""LoRA vs full fine-tuning: trainable parameters, optimizer-state bytes and weight-sync bytes (analytically, at
Show-o-512 shapes), and seconds per weight sync measured on a smaller model on this machine.

Analytic part (exact counts from the module shapes, built on the meta device; no weights):
- trainable parameters: every parameter for full fine-tuning; the adapters' r·(in + out) per adapted layer;
- optimizer state (bf16 mixed precision, as DeepSpeed keeps it): fp32 master copy + AdamW's two fp32 moments,
  12 bytes per trainable parameter, plus its gradient (bf16, 2 bytes); the KL reference of full fine-tuning is a
  second bf16 copy of the model (LoRA: none, the base with the adapters off);
- sync bytes (bf16, the rollout workers' dtype on GPUs): the full model, the adapters only (what `learner.lora`
  sends), or the merged deltas (every adapted matrix's W + ΔW, the alternative: as large as those matrices).

Measured part: one sync of a smaller Show-o (the learner's `iter_weight_buckets` into a receiving copy) through
the in-process apply, the object store's serialisation (pickle of each bucket, as ``ray.put`` does) and a gloo
broadcast group between two threads (the collective path on CPUs); and the rollout's forward time with unmerged
adapters (what a sync of adapters costs at sampling time) against the plain model.

    DS_ACCELERATOR=cpu python -m benchmarks.bench_lora                  # analytic + measured (CPU)
    python -m benchmarks.bench_lora --hidden 1024 --layers 8 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from learner.config import LoraSettings  # noqa: E402
from learner.lora import adapter_parameters, add_adapters, lora_layers  # noqa: E402
from benchmarks.tiny_models import random_showo, tiny_showo_config  # noqa: E402
from learner.weights_export import apply_weight_bucket, iter_weight_buckets  # noqa: E402
from policy.showo import Showo, ShowoConfig  # noqa: E402

RANKS = (16, 64, 256)
BF16, FP32 = 2, 4
ADAM_STATE = 12            # fp32 master + two fp32 moments per trainable parameter (bf16 mixed precision)


def show_o_512() -> ShowoConfig:
    """showlab/show-o-512x512: Phi-1.5 (24 layers, hidden 2048, MLP 8192), 58498 tokens, 32x32 = 1024 image tokens."""
    return ShowoConfig(num_vq_tokens=1024, max_seq_length=128)


def analytic(config: ShowoConfig, ranks=RANKS, targets=None) -> list[dict]:
    with torch.device("meta"):
        base = Showo(config)
    total = sum(p.numel() for p in base.parameters())
    rows = [{"setting": "full fine-tuning", "trainable": total, "optimizer_bytes": ADAM_STATE * total,
             "grad_bytes": BF16 * total, "reference_bytes": BF16 * total, "sync_bytes": BF16 * total}]
    for r in ranks:
        settings = LoraSettings(rank=r, **({"target_modules": targets} if targets else {}))
        with torch.device("meta"):
            model = add_adapters(Showo(config), settings)
        n = sum(p.numel() for _, p in adapter_parameters(model))
        merged = sum(layer.base_layer.weight.numel() for _, layer in lora_layers(model))
        rows.append({"setting": f"LoRA rank {r}", "trainable": n, "optimizer_bytes": ADAM_STATE * n,
                     "grad_bytes": BF16 * n, "reference_bytes": 0, "sync_bytes": BF16 * n,
                     "merged_delta_bytes": BF16 * merged})
    for row in rows:
        row["sync_share"] = row["sync_bytes"] / rows[0]["sync_bytes"]
    return rows


def _gloo_sync(sender: nn.Module, receiver: nn.Module, bucket_bytes: int, adapters: bool) -> float:
    from actors.weight_sync import SyncGroupSpec, WeightSyncGroup
    from learner.dist import free_port
    spec = SyncGroupSpec(f"bench-{time.monotonic_ns()}", "127.0.0.1", free_port(), 2, "gloo", 120.0)
    ready = threading.Barrier(2)
    out: dict = {}

    def send():
        group = WeightSyncGroup(spec, 0)
        ready.wait()
        out.update(group.send(iter_weight_buckets(sender, bucket_bytes, 1, adapters_only=adapters)))

    t = threading.Thread(target=send)
    t.start()
    group = WeightSyncGroup(spec, 1)
    ready.wait()
    t0 = time.perf_counter()
    group.receive(receiver, bucket_bytes, None, 1)
    seconds = time.perf_counter() - t0
    t.join(120)
    return seconds


def measured(config: ShowoConfig, ranks=RANKS, repeats: int = 3, bucket_bytes: int = 64 << 20) -> list[dict]:
    rows = []
    plain = random_showo(0, config)
    text = plain.layout.text_area([[5, 6, 7]] * 4)
    codes = torch.randint(0, config.codebook_size, (4, config.num_vq_tokens))

    def forward_s(model):
        with torch.no_grad():
            model.image_logits_full(text, codes)
            t0 = time.perf_counter()
            for _ in range(repeats):
                model.image_logits_full(text, codes)
        return (time.perf_counter() - t0) / repeats

    base_forward = forward_s(plain)
    for r in (0, *ranks):
        if r:
            sender = add_adapters(random_showo(0, config), LoraSettings(rank=r))
            receiver = add_adapters(random_showo(1, config), LoraSettings(rank=r)).requires_grad_(False)
            with torch.no_grad():
                for _, p in adapter_parameters(sender):
                    p.normal_(0, 0.01)
        else:
            sender, receiver = plain, random_showo(1, config)
        adapters = bool(r)
        timings = {"in_process": [], "object_store": [], "gloo": []}
        nbytes = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            nbytes = 0
            for b in iter_weight_buckets(sender, bucket_bytes, 1, adapters_only=adapters):
                apply_weight_bucket(receiver, b)
                nbytes += b.nbytes
            timings["in_process"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for b in iter_weight_buckets(sender, bucket_bytes, 1, adapters_only=adapters):
                apply_weight_bucket(receiver, pickle.loads(pickle.dumps(b)))
            timings["object_store"].append(time.perf_counter() - t0)
            timings["gloo"].append(_gloo_sync(sender, receiver, bucket_bytes, adapters))
        row = {"setting": f"LoRA rank {r}" if r else "full fine-tuning", "sync_bytes": nbytes,
               **{f"{k}_s": min(v) for k, v in timings.items()},
               "rollout_forward_s": forward_s(receiver) if r else base_forward}
        rows.append(row)
    for row in rows:
        row["sync_share"] = row["sync_bytes"] / rows[0]["sync_bytes"]
    return rows


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="measured model: hidden size")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--codebook", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=256, help="image tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-measured", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    result: dict = {"analytic": analytic(show_o_512())}
    full = result["analytic"][0]
    print(f"Show-o-512 shapes (analytic): {full['trainable'] / 1e9:.3f} B parameters; bf16 training, bf16 sync")
    print(f"{'setting':18} {'trainable':>14} {'AdamW state':>12} {'grads':>11} {'KL reference':>13} "
          f"{'sync bytes':>11} {'share':>7} {'merged deltas':>14}")
    for r in result["analytic"]:
        print(f"{r['setting']:18} {r['trainable']:>14,} {_mb(r['optimizer_bytes']):>12} {_mb(r['grad_bytes']):>11} "
              f"{_mb(r['reference_bytes']):>13} {_mb(r['sync_bytes']):>11} {100 * r['sync_share']:>6.2f}% "
              f"{_mb(r.get('merged_delta_bytes', r['sync_bytes'])):>14}")
    if not args.skip_measured:
        cfg = tiny_showo_config(hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                                num_vq_tokens=args.tokens, codebook_size=args.codebook)
        cfg.max_seq_length = 16
        n = sum(p.numel() for p in Showo(cfg).parameters())
        result["measured_model"] = {"hidden": args.hidden, "layers": args.layers, "codebook": args.codebook,
                                    "tokens": args.tokens, "parameters": n, "threads": args.threads}
        result["measured"] = measured(cfg, repeats=args.repeats)
        print(f"\nmeasured (CPU, {args.threads} threads, fp32, best of {args.repeats}): Show-o hidden {args.hidden}, "
              f"{args.layers} layers, codebook {args.codebook}, {args.tokens} image tokens, {n / 1e6:.1f} M parameters")
        print(f"{'setting':18} {'sync bytes':>11} {'share':>7} {'in-process':>11} {'object store':>13} {'gloo':>8} "
              f"{'rollout fwd':>12}")
        for r in result["measured"]:
            print(f"{r['setting']:18} {_mb(r['sync_bytes']):>11} {100 * r['sync_share']:>6.2f}% "
                  f"{r['in_process_s']:>10.4f}s {r['object_store_s']:>12.4f}s {r['gloo_s']:>7.4f}s "
                  f"{r['rollout_forward_s']:>11.4f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
