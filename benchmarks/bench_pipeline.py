"""The Ray pipeline's costs: end-to-end throughput, weight broadcast, object-store traffic per trajectory.

1. **End to end** (images/s): the product's training step (`cluster.driver.Trainer.train_step`) on the tiny config,
   on Ray (rollout workers → reward actor → learner rank → weight sync, synchronous and with `max_staleness=1`)
   and on the local backend (every role in this process, no Ray).
2. **Weight broadcast** (seconds, MB/s) against the parameter bytes: the collective path (a gloo group, one
   sender and R receivers, as `actors.weight_sync`) against the object store (the sender `ray.put`s the
   buckets, every receiver fetches and applies them), for a few model sizes.
3. **Object store per trajectory**: bytes of one group's `Trajectory`, `ray.put` time on the producer and
   `ray.get` time on a consumer actor, for the tiny config and Show-o 256/512-sized groups.

    DS_ACCELERATOR=cpu python -m benchmarks.bench_pipeline                 # everything (a few minutes)
    DS_ACCELERATOR=cpu python -m benchmarks.bench_pipeline --only broadcast --sizes-mb 4,64,256
    maskgrpo bench pipeline --only trajectory

Each role limits itself to one torch thread (cluster.cpus_per_actor = 1), on either backend.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

TINY = str(REPO / "configs" / "tiny.yaml")


def _cfg(out: str, overrides: list[str]):
    from cluster.config import load_config
    return load_config(TINY, [f"output_dir={out}", "learner.warmup_steps=0", "learner.lr=1e-3",
                              "logging.progress=false", *overrides])


def _ray(num_cpus: int) -> None:
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                 log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}})


# ---------------------------------------------------------------------------------------------- 1. end to end

def bench_pipeline(out: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """The product's training step (`Trainer.train_step`) on the backend the overrides name, timed."""
    from cluster.driver import Trainer
    cfg = _cfg(out, overrides)
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    try:
        tr.sync_weights()
        startup = time.perf_counter() - t0
        for _ in range(warmup):
            tr.train_step()
        recs, t0, since = [], time.perf_counter(), time.time()
        for _ in range(steps):
            recs.append(tr.train_step().to_json())
        wall = time.perf_counter() - t0
        busy = tr.timeline.busy_share(since=since)     # each role's share of the timed steps' wall time
    finally:
        tr.shutdown()
    images = sum(r["groups"] for r in recs) * cfg.data.group_size
    mean = lambda k: statistics.fmean(r[k] for r in recs)  # noqa: E731
    return {"images_per_s": images / wall, "step_s": wall / steps, "startup_s": startup,
            "rollout_s": mean("rollout_seconds"), "reward_s": mean("reward_seconds"),
            "learner_s": mean("learner_seconds"), "sync_s": mean("sync_seconds"),
            "staleness_mean": mean("staleness_mean"),
            **{f"busy_{role}": share for role, share in busy.items() if role != "driver"}}


# ---------------------------------------------------------------------------------------------- 2. weight broadcast

class Peer:
    """A process holding a model of `numel` float32 parameters (in `pieces` tensors), as a learner rank 0
    (sender, rank 0) or a rollout worker (receiver) would."""

    def __init__(self, numel: int, pieces: int = 16, seed: int = 0):
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        sizes = [numel // pieces + (1 if i < numel % pieces else 0) for i in range(pieces)]
        self.model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n)) for n in sizes])
        self.group = None

    def address(self) -> tuple[str, int]:
        from actors.learner import free_port, node_address
        return node_address(), free_port()

    def join(self, spec, rank: int) -> bool:
        from actors.weight_sync import WeightSyncGroup
        self.group = WeightSyncGroup(spec, rank)
        return True

    def send(self, bucket_bytes: int, version: int) -> float:
        from learner.weights_export import iter_weight_buckets
        return self.group.send(iter_weight_buckets(self.model, bucket_bytes, version))["bytes"]

    def receive(self, bucket_bytes: int, version: int) -> int:
        return self.group.receive(self.model, bucket_bytes, None, version)

    def export(self, bucket_bytes: int, version: int) -> list:
        import ray
        from learner.weights_export import iter_weight_buckets
        return [ray.put(b) for b in iter_weight_buckets(self.model, bucket_bytes, version)]

    def load(self, refs: list) -> int:
        import ray
        from learner.weights_export import apply_weight_bucket
        version = -1
        for b in ray.get(list(refs)):
            version = apply_weight_bucket(self.model, b)
        return version

    def digest(self) -> str:
        from actors.weight_sync import param_digest
        return param_digest(self.model)


def bench_broadcast(sizes_mb: list[float], receivers: int, bucket_mb: int, reps: int) -> list[dict[str, Any]]:
    import ray
    from actors.weight_sync import SyncGroupSpec
    cls = ray.remote(num_cpus=1)(Peer)
    rows = []
    bucket_bytes = bucket_mb << 20
    for mb in sizes_mb:
        numel = int(mb * (1 << 20)) // 4
        sender = cls.remote(numel, seed=1)
        peers = [cls.remote(numel, seed=2 + i) for i in range(receivers)]
        addr, port = ray.get(sender.address.remote())
        spec = SyncGroupSpec(f"bench{mb}", addr, port, receivers + 1, "gloo", 300.0)
        ray.get([sender.join.remote(spec, 0)] + [p.join.remote(spec, r) for r, p in enumerate(peers, start=1)])
        coll, store = [], []
        for v in range(reps + 1):                     # the first of each is a warm-up
            t0 = time.perf_counter()
            ray.get([sender.send.remote(bucket_bytes, v)] + [p.receive.remote(bucket_bytes, v) for p in peers])
            coll.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            refs = ray.get(sender.export.remote(bucket_bytes, v))
            ray.get([p.load.remote(refs) for p in peers])
            store.append(time.perf_counter() - t0)
            del refs
        digests = set(ray.get([sender.digest.remote()] + [p.digest.remote() for p in peers]))
        nbytes = numel * 4
        c, s = statistics.median(coll[1:]), statistics.median(store[1:])
        rows.append({"MB": nbytes / 2**20, "receivers": receivers, "collective_s": c, "object_store_s": s,
                     "collective_MB_per_s": nbytes / 2**20 / c, "object_store_MB_per_s": nbytes / 2**20 / s,
                     "identical": len(digests) == 1})
        for a in [sender, *peers]:
            ray.kill(a)
    return rows


# ---------------------------------------------------------------------------------------------- 3. trajectories

def synthetic_trajectory(B: int, T: int, N: int, L: int):
    from policy.trajectory import Trajectory
    g = torch.Generator().manual_seed(0)
    return Trajectory(condition={"ids": torch.randint(0, 100, (B, L), generator=g)},
                      null_condition={"ids": torch.randint(0, 100, (B, L), generator=g)},
                      unmask_step=torch.randint(0, T, (B, N), generator=g),
                      sampled_codes=torch.randint(-1, 8192, (B, T, N), generator=g),
                      token_logprob=-torch.rand(B, T, N, generator=g),
                      remask_logprob=-torch.rand(B, T, N, generator=g),
                      threshold=torch.rand(B, T, generator=g), final_codes=torch.randint(0, 8192, (B, N), generator=g),
                      meta={"group_id": 0, "prompt": "a photo of a cat"})


class Consumer:
    def fetch(self, refs: list) -> dict[str, float]:
        import ray
        t0 = time.perf_counter()
        trajs = ray.get(list(refs))
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "codes_sum": float(sum(int(t.final_codes.sum()) for t in trajs))}


def bench_trajectories(reps: int) -> list[dict[str, Any]]:
    import pickle

    import ray
    consumer = ray.remote(num_cpus=1)(Consumer).remote()
    shapes = {"tiny group (G=4, T=6, N=16)": (4, 6, 16, 16),
              "Show-o 256 group (G=16, T=50, N=256)": (16, 50, 256, 128),
              "Show-o 512 group (G=16, T=50, N=1024)": (16, 50, 1024, 128)}
    rows = []
    for name, (B, T, N, L) in shapes.items():
        traj = synthetic_trajectory(B, T, N, L)
        tensor_bytes = sum(v.numel() * v.element_size() for v in vars(traj).values() if isinstance(v, torch.Tensor))
        pickled = len(pickle.dumps(traj, protocol=5))
        puts, gets = [], []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            ref = ray.put(traj)
            puts.append(time.perf_counter() - t0)
            gets.append(ray.get(consumer.fetch.remote([ref]))["seconds"])
            del ref
        rows.append({"trajectory": name, "tensor_MB": tensor_bytes / 2**20, "pickled_MB": pickled / 2**20,
                     "put_ms": 1e3 * statistics.median(puts[1:]), "get_ms_in_actor": 1e3 * statistics.median(gets[1:])})
    ray.kill(consumer)
    return rows


# ---------------------------------------------------------------------------------------------- main

def _table(rows: list[dict[str, Any]], title: str) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys]
    lines = [title, " | ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += [" | ".join(fmt(r[k]).rjust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["pipeline", "broadcast", "trajectory"], action="append",
                    help="run only these parts (repeatable; default all)")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per pipeline variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--sizes-mb", default="1,16,128", help="model sizes (float32 MB) for the broadcast part")
    ap.add_argument("--receivers", type=int, default=2, help="rollout workers receiving the broadcast")
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/maskgrpo_bench_pipeline")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    parts = args.only or ["pipeline", "broadcast", "trajectory"]
    results: dict[str, Any] = {"cpus": os.cpu_count(), "torch": torch.__version__}
    common = [f"data.prompts_per_step={args.prompts_per_step}", f"data.group_size={args.group_size}",
              f"max_steps={args.steps + args.warmup}"]
    _ray(num_cpus=12)
    if "pipeline" in parts:
        rows = []
        for label, extra in [("ray, 1 rollout worker", ["cluster.num_rollout_workers=1"]),
                             ("ray, 2 rollout workers", ["cluster.num_rollout_workers=2"]),
                             ("ray, 2 workers, max_staleness=1", ["cluster.num_rollout_workers=2",
                                                                  "cluster.max_staleness=1"]),
                             ("local backend (one process, no Ray)", ["cluster.backend=local"])]:
            r = bench_pipeline(f"{args.out}/{len(rows)}", common + extra, args.steps, args.warmup)
            rows.append({"pipeline": label, **r})
            print(_table(rows[-1:], ""), flush=True)
        keys = ["pipeline", "images_per_s", "step_s", "rollout_s", "reward_s", "learner_s", "sync_s", "busy_rollout",
                "busy_reward", "busy_learner", "busy_weight_sync"]
        results["pipeline"] = rows
        print(_table([{k: r.get(k, float("nan")) for k in keys} for r in rows],
                     f"\nend to end, tiny config, {args.prompts_per_step} prompts x {args.group_size} samples a "
                     f"step ({args.steps} timed steps)"), flush=True)
    if "broadcast" in parts:
        rows = bench_broadcast([float(x) for x in args.sizes_mb.split(",")], args.receivers, args.bucket_mb,
                               args.reps)
        results["broadcast"] = rows
        print(_table(rows, f"\nweight broadcast, 1 sender -> {args.receivers} receivers, {args.bucket_mb} MB buckets "
                           f"(median of {args.reps})"), flush=True)
    if "trajectory" in parts:
        rows = bench_trajectories(max(args.reps, 5))
        results["trajectory"] = rows
        print(_table(rows, "\nobject store per trajectory (one group)"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
