"""Scoring throughput through the reward server on loopback vs in-process, as a share, and the server's peak memory
per request body.

    python -m benchmarks.bench_reward_server                       # CLIP score, ViT-B-32, random weights, CPU
    python -m benchmarks.bench_reward_server --model tiny          # the tests' tiny CLIP: the protocol's overhead
    python -m benchmarks.bench_reward_server --model constant      # no model: the server's own memory per body
    python -m benchmarks.bench_reward_server --baseline-repo /tmp/old   # also an older checkout's server, alternated
    maskgrpo bench reward_server --batch 16 --size 256 --iters 5 --memory-mb 1 10 50

Both sides score the same `iters` batches of random uint8 images (distinct batches, so the server's idempotency
cache never answers); the server is a real `maskgrpo serve-reward` subprocess on 127.0.0.1 and the client the
`remote` reward, one request per batch, as a reward actor sends them. The model is loaded through the real
loader from random weights saved in the release format. With `--baseline-repo`, a second server runs from that
checkout (e.g. `git worktree add /tmp/old <commit>`) and its rounds alternate with the others, so the before/after
comparison sees the same load.

Memory (`--memory-mb`, default 1 10 50): for each size a fresh server, one warm-up request of one model batch,
then one body of about that many MB (distinct images of the benchmark's size, one request); the growth of the
server's peak resident set (VmHWM, reset through /proc/PID/clear_refs after the warm-up) over its resident set just
before the request is printed, with that growth as a multiple of the body.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rewards.base import build_reward  # noqa: E402

PROMPTS = ["a photo of a red car", "two dogs on a couch", "a blue fire hydrant", "a cup left of a laptop"]


def clip_spec(model: str, d: Path) -> dict:
    """A clip_score spec on random weights: the tests' tiny CLIP, or a full open_clip architecture by name (or a
    constant reward: no model)."""
    if model == "constant":          # no model at all: what the protocol and the server cost by themselves
        return {"name": "tests.helpers.rewards:ConstantReward", "value": 0.5}
    if model == "tiny":
        from benchmarks.tiny_models import make_tiny_open_clip
        cfg, ckpt = make_tiny_open_clip(d / "clip")
        return {"name": "clip_score", "path": ckpt, "model_config": cfg}
    from rewards.openclip import create_open_clip
    torch.manual_seed(0)
    path = d / "open_clip_pytorch_model.bin"
    torch.save(create_open_clip(model, False).state_dict(), path)
    return {"name": "clip_score", "arch": model, "path": str(path)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(spec: dict, d: Path, token: str, max_batch: int, repo: Path = REPO) -> tuple[subprocess.Popen, str]:
    """A `serve-reward` subprocess of the checkout at `repo` (this one by default) and its URL, once healthy."""
    import httpx
    config = d / f"serve-{_free_port()}.yaml"
    config.write_text(json.dumps({"rewards": [spec], "reward_server": {"max_batch": max_batch}}))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(repo), "MASKGRPO_REWARD_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve-reward", "--config", str(config), "--port",
                             str(port)], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-reward exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"serve-reward did not answer /health at {url} within 300 s")


def _rate(reward, batches: list[torch.Tensor]) -> float:
    prompts = (PROMPTS * batches[0].shape[0])[:batches[0].shape[0]]
    reward.score(batches[0], prompts)                  # warm-up (not timed)
    t0 = time.perf_counter()
    for images in batches[1:]:
        out = reward.score(images, prompts)
    assert torch.isfinite(out.scores).all()
    return sum(b.shape[0] for b in batches[1:]) / (time.perf_counter() - t0)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_memory(serve: Callable[[], tuple[subprocess.Popen, str]], token: str, sizes_mb: Sequence[float], side: int,
                warm: int, seed: int = 1) -> list[tuple[float, int, int]]:
    """[(MB asked, body bytes, peak RSS growth in bytes)]: for each size a fresh server from `serve()`, one warm-up
    request of `warm` images, then one request of that size (see the module doc)."""
    import httpx

    from rewards.protocol import encode_request
    g = torch.Generator().manual_seed(seed)
    headers = {"Authorization": f"Bearer {token}"}

    def body(n: int) -> bytes:
        images = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g)
        return json.dumps(encode_request(images, (PROMPTS * n)[:n], [{}] * n)).encode()
    per_image = len(body(1))
    out = []
    for mb in sizes_mb:
        data = body(max(1, round(mb * 1e6 / per_image)))
        proc, url = serve()
        try:
            assert httpx.post(f"{url}/score", content=body(warm), headers=headers, timeout=600).status_code == 200
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")      # VmHWM := VmRSS
            before = _status_kib(proc.pid, "VmRSS")
            resp = httpx.post(f"{url}/score", content=data, headers=headers, timeout=600)
            assert resp.status_code == 200, resp.text[:300]
            out.append((mb, len(data), (_status_kib(proc.pid, "VmHWM") - before) * 1024))
        finally:
            proc.terminate()
            proc.wait(30)
        del data
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32",
                    help="open_clip architecture (random weights), 'tiny', or 'constant' (no model: the server alone; "
                         "tests.helpers.rewards:ConstantReward of this checkout)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--iters", type=int, default=5, help="timed batches per round (one more warms up)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating in-process / server rounds (best counts)")
    ap.add_argument("--baseline-repo", default=None, help="also serve from this checkout (before/after, alternated)")
    ap.add_argument("--memory-mb", type=float, nargs="*", default=[1, 10, 50],
                    help="request bodies (MB) whose peak memory on the server is measured (none: skip)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=g)
               for _ in range(args.iters + 1)]
    token = os.urandom(16).hex()
    servers = {"server": REPO}
    if args.baseline_repo:
        servers["baseline server"] = Path(args.baseline_repo).resolve()
    rates: dict[str, list[float]] = {"in-process": [], **{name: [] for name in servers}}
    memory: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        spec = clip_spec(args.model, d)
        reward = build_reward(spec)
        procs = {}
        try:
            for name, repo in servers.items() if args.rounds else ():
                procs[name] = _serve(spec, d, token, max_batch=args.batch, repo=repo)
            os.environ["MASKGRPO_REWARD_TOKEN"] = token
            remotes = {name: build_reward({"name": "remote", "url": url, "request_size": args.batch,
                                           "timeout_s": 600}) for name, (_, url) in procs.items()}
            for r in range(args.rounds):     # alternate, so load from other processes hits every side alike
                rates["in-process"].append(_rate(reward, batches))
                for k, (name, remote) in enumerate(remotes.items()):
                    # fresh images each round and server: the server's cache must never answer
                    rnd = [b.roll(r + 1, dims=0).flip(1 + k % 2) if r % 2 else b.roll(r + 1 + k, dims=0)
                           for b in batches]
                    rates[name].append(_rate(remote, rnd))
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(30)
        for name, repo in servers.items() if args.memory_mb else ():
            memory[name] = peak_memory(lambda: _serve(spec, d, token, max_batch=args.batch, repo=repo), token,
                                       args.memory_mb, args.size, args.batch)
    print(f"# clip_score {args.model} (random weights), batch {args.batch} x {args.size}x{args.size} uint8, "
          f"{args.iters} timed batches, {torch.get_num_threads()} torch threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; server: serve-reward on 127.0.0.1"
          + (f"; baseline: {servers['baseline server']}" if args.baseline_repo else ""))
    if args.rounds:
        print(f"{'path':<16} {'best images/s':>14}   rounds")
    for name, xs in rates.items() if args.rounds else ():
        print(f"{name:<16} {max(xs):>14.2f}   {' '.join(f'{x:.2f}' for x in xs)}")
    for name in servers if args.rounds else ():
        print(f"share: {max(rates[name]) / max(rates['in-process']):.1%} of in-process throughput ({name}, best "
              f"round each)")
    if args.baseline_repo and args.rounds:
        print(f"server / baseline server: {max(rates['server']) / max(rates['baseline server']):.3f} "
              f"(best round each)")
    for name, rows in memory.items():
        print(f"# peak memory of the {name} (a fresh server per size, warmed up with one batch of {args.batch}: growth "
              f"of its peak RSS over its RSS before the request)")
        print(f"{'body MB':>8} {'body bytes':>12} {'peak growth MiB':>16} {'x body':>7}")
        for mb, nbytes, grow in rows:
            print(f"{mb:>8g} {nbytes:>12} {grow / 2 ** 20:>16.1f} {grow / nbytes:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
