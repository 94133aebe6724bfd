"""Scoring throughput through the reward server on loopback vs in-process, as a share.

    python -m benchmarks.bench_reward_server                       # CLIP score, ViT-B-32, random weights, CPU
    python -m benchmarks.bench_reward_server --model tiny          # the tests' tiny CLIP: the protocol's overhead
    maskgrpo bench reward_server --batch 16 --size 256 --iters 5

Both sides score the same `iters` batches of random uint8 images (distinct batches, so the server's idempotency
cache never answers); the server is a real `maskgrpo serve-reward` subprocess on 127.0.0.1 and the client the
`remote` reward, one request per batch, as a reward actor sends them. The model is loaded through the real
loader from random weights saved in the release format.
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
from typing import Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rewards.base import build_reward  # noqa: E402

PROMPTS = ["a photo of a red car", "two dogs on a couch", "a blue fire hydrant", "a cup left of a laptop"]


def clip_spec(model: str, d: Path) -> dict:
    """A clip_score spec on random weights: the tests' tiny CLIP, or a full open_clip architecture by name."""
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


def _serve(spec: dict, d: Path, token: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    import httpx
    config = d / "serve.yaml"
    config.write_text(json.dumps({"rewards": [spec], "reward_server": {"max_batch": max_batch}}))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASKGRPO_REWARD_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve-reward", "--config", str(config), "--port",
                             str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights), or 'tiny'")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--iters", type=int, default=5, help="timed batches per round (one more warms up)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating in-process / server rounds (best counts)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=g)
               for _ in range(args.iters + 1)]
    token = os.urandom(16).hex()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        spec = clip_spec(args.model, d)
        reward = build_reward(spec)
        proc, url = _serve(spec, d, token, max_batch=args.batch)
        rates: dict[str, list[float]] = {"in-process": [], "server": []}
        try:
            os.environ["MASKGRPO_REWARD_TOKEN"] = token
            remote = build_reward({"name": "remote", "url": url, "request_size": args.batch, "timeout_s": 600})
            for r in range(args.rounds):     # alternate, so load from other processes hits both sides alike
                rates["in-process"].append(_rate(reward, batches))
                # fresh images each round: the server's cache must never answer
                rnd = [b.roll(r + 1, dims=0).flip(1) if r % 2 else b.roll(r + 1, dims=0) for b in batches]
                rates["server"].append(_rate(remote, rnd))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"# clip_score {args.model} (random weights), batch {args.batch} x {args.size}x{args.size} uint8, "
          f"{args.iters} timed batches, {torch.get_num_threads()} torch threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; server: serve-reward on 127.0.0.1")
    print(f"{'path':<14} {'best images/s':>14}   rounds")
    for name, xs in rates.items():
        print(f"{name:<14} {max(xs):>14.2f}   {' '.join(f'{x:.2f}' for x in xs)}")
    print(f"share: {max(rates['server']) / max(rates['in-process']):.1%} of in-process throughput (best round each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
