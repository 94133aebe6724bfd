"""The reward server (`maskgrpo serve-reward`, a real subprocess on loopback) and the `remote` reward: equal to
in-process scoring, malformed input answered 4xx, the token required, concurrent requests merged into one batch,
retried requests answered once, and a dead, silent or garbage-speaking server a RewardError naming the URL in
bounded time."""
from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from rewards.base import RewardError, build_rewards
from rewards.protocol import IDEMPOTENCY_HEADER, ScoreBatch, encode_request
from rewards.server import RewardService
from tests.helpers.net import RawServer, free_port, http_answer
from worlds.shapes.render import render_batch
from worlds.shapes.world import all_prompts

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-7f3a"
SPECS = [{"name": "geneval", "weight": 1.0, "detector": {"name": "shapes"}, "count_credit": "graded"},
         {"name": "tests.helpers.rewards:PixelMeanReward", "label": "pix", "weight": 0.5}]


def start_server(config: Path, port: int, *extra: str, token: str | None = TOKEN) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    env.pop("MASKGRPO_REWARD_TOKEN", None)
    if token is not None:
        env["MASKGRPO_REWARD_TOKEN"] = token
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve-reward", "--config", str(config),
                             "--port", str(port), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_healthy(proc: subprocess.Popen, url: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the server at {url} did not become healthy in {limit_s} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    config = d / "serve.yaml"
    config.write_text(json.dumps({"rewards": SPECS, "reward_server": {"max_batch": 64, "max_body_mb": 2}}))
    port = free_port()
    proc = start_server(config, port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    yield {"url": url, "proc": proc, "config": config}
    stop(proc)


@pytest.fixture()
def token_env(monkeypatch):
    monkeypatch.setenv("MASKGRPO_REWARD_TOKEN", TOKEN)


def batch(n: int = 24, seed: int = 0):
    items = all_prompts()[:n]
    images = torch.from_numpy(render_batch(items, np.random.default_rng(seed), max_distractors=2))
    return images, [it.prompt for it in items], [it.to_json() for it in items]


def post(url: str, body: bytes | dict, token: str | None = TOKEN, **headers) -> httpx.Response:
    h = {"Authorization": f"Bearer {token}"} if token else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/score", content=content, headers={**h, **headers}, timeout=30)


# ---------------------------------------------------------------------------------------------- scoring

def test_remote_reward_equals_in_process_scoring(server, token_env):
    images, prompts, meta = batch()
    local = build_rewards(SPECS).score(images, prompts, meta)
    remote = build_rewards([{"name": "remote", "url": server["url"], "request_size": 10, "max_concurrency": 3}])
    out = remote.score(images, prompts, meta)
    assert torch.equal(out.scores, local.scores)                    # bit for bit: float32 through JSON
    assert torch.equal(out.components["remote"], local.scores)
    assert torch.equal(out.details["remote/geneval"], local.components["geneval"])
    assert torch.equal(out.details["remote/pix"], local.components["pix"])
    assert torch.equal(out.details["remote/geneval/strict"], local.details["geneval/strict"])
    # in a weighted sum with a local reward, like any other
    mixed = build_rewards([{"name": "remote", "url": server["url"], "weight": 2.0},
                           {"name": "tests.helpers.rewards:ConstantReward", "label": "one", "value": 1.0}])
    assert torch.equal(mixed.score(images, prompts, meta).scores, 2.0 * local.scores + 1.0)
    desc = remote.components[0][2].describe()
    assert desc["labels"] == ["geneval", "pix"] and desc["weights"] == {"geneval": 1.0, "pix": 0.5}


def test_a_retried_request_is_answered_from_the_cache(server):
    images, prompts, meta = batch(4, seed=3)
    body = json.dumps(encode_request(images, prompts, meta)).encode()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before = httpx.get(f"{server['url']}/describe", headers=headers).json()
    a = post(server["url"], body, **{IDEMPOTENCY_HEADER: "group-17-step-3"})
    b = post(server["url"], body, **{IDEMPOTENCY_HEADER: "group-17-step-3"})
    after = httpx.get(f"{server['url']}/describe", headers=headers).json()
    assert a.status_code == b.status_code == 200 and a.json() == b.json()
    assert after["batches_scored"] == before["batches_scored"] + 1      # scored once
    assert after["cache_hits"] == before["cache_hits"] + 1


def test_concurrent_requests_are_merged_into_one_model_batch():
    rewards = build_rewards(SPECS)
    service = RewardService(rewards, max_batch=10, max_wait_ms=0)
    parts = [batch(4, seed=s) for s in range(4)]

    async def run():
        service.start()
        try:
            return await asyncio.gather(*[service.score(ScoreBatch(*p)) for p in parts])
        finally:
            await service.stop()
    answers = asyncio.run(run())
    assert service.batch_sizes == [8, 8]          # 4 requests of 4 images, merged up to 10 images a batch
    for (images, prompts, meta), ans in zip(parts, answers):
        assert ans["scores"] == rewards.score(images, prompts, meta).scores.tolist()


# ---------------------------------------------------------------------------------------------- bad input

def _encoded(images, prompts, meta) -> dict:
    return encode_request(images, prompts, meta)


@pytest.mark.parametrize("mutate, status, message", [
    (lambda r: r["images"].update(dtype="float32"), 422, "images.dtype must be 'uint8'"),
    (lambda r: r["images"].update(shape=[2, 16, 16, 4]), 422, r"images.shape must be \[B, H, W, 3\]"),
    (lambda r: r["images"].update(data=base64.b64encode(b"xx").decode()), 422, "holds 2 bytes but shape"),
    (lambda r: r.pop("metadata"), 422, r"lacks \['metadata'\]"),
    (lambda r: r.update(metadata=[{}, {}]), 422, "GenEval reward needs each sample's metadata"),
    (lambda r: r.update(prompts=["only one"]), 422, "prompts must be a list of 2 strings"),
])
def test_malformed_requests_get_a_4xx_with_the_reason(server, mutate, status, message):
    images, prompts, meta = batch(2)
    req = _encoded(images, prompts, meta)
    mutate(req)
    resp = post(server["url"], req)
    assert resp.status_code == status, resp.text
    assert re.search(message, resp.json()["error"]), resp.json()
    assert httpx.get(f"{server['url']}/health").status_code == 200         # still serving


def test_bad_json_oversized_body_and_missing_token(server):
    url = server["url"]
    assert post(url, b"{not json").status_code == 400
    big = post(url, b"x" * (3 << 20))
    assert big.status_code == 413 and "exceeds" in big.json()["error"]
    images, prompts, meta = batch(2)
    req = _encoded(images, prompts, meta)
    assert post(url, req, token=None).status_code == 401
    assert post(url, req, token="wrong").status_code == 401
    assert httpx.get(f"{url}/describe").status_code == 401
    assert post(url, req).status_code == 200


def test_remote_reward_reports_a_4xx_in_one_line_without_retrying(server, token_env):
    images, prompts, _ = batch(2)
    remote = build_rewards([{"name": "remote", "url": server["url"]}])
    t0 = time.monotonic()
    with pytest.raises(RewardError) as e:
        remote.score(images, prompts, [{}, {}])
    msg = str(e.value)
    assert server["url"] in msg and "HTTP 422" in msg and "GenEval reward needs" in msg and "\n" not in msg
    assert time.monotonic() - t0 < 10


def test_remote_reward_without_its_token_env_fails_at_build(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    with pytest.raises(ValueError, match="environment variable NO_SUCH_TOKEN_VAR is not set"):
        build_rewards([{"name": "remote", "url": server["url"], "token_env": "NO_SUCH_TOKEN_VAR"}])


def test_serve_reward_refuses_to_start_without_a_token(tmp_path, server):
    proc = start_server(server["config"], free_port(), token=None)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no bearer token: set MASKGRPO_REWARD_TOKEN or pass --token-file" in out
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = start_server(server["config"], port, "--token-file", str(token_file), token=None)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        images, prompts, meta = batch(2)
        assert post(f"http://127.0.0.1:{port}", _encoded(images, prompts, meta)).status_code == 200
    finally:
        stop(proc)


@pytest.mark.parametrize("argv, expect", [
    (["--token", "s3cr3t-VALUE"], "--token is refused"),
    (["--token=s3cr3t-VALUE"], "--token is refused"),
    (["--tok", "s3cr3t-VALUE"], "unrecognized arguments: --tok"),          # no abbreviation of --token-file
    (["--tok=s3cr3t-VALUE"], "unrecognized arguments: --tok=<not shown>"),
    (["--token-f", "s3cr3t-VALUE"], "unrecognized arguments: --token-f"),
    (["s3cr3t-VALUE"], "overrides must look like key=value"),
    (["--token-file", "s3cr3t-VALUE"], "cannot read --token-file (no such file; the path is not shown)"),
])
def test_serve_reward_refuses_a_token_on_the_command_line_without_repeating_it(capsys, monkeypatch, argv, expect):
    from cluster.cli import main
    monkeypatch.delenv("MASKGRPO_REWARD_TOKEN", raising=False)
    try:
        code = main(["serve-reward", *argv])
    except SystemExit as e:                     # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and expect in err, err
    assert "s3cr3t-VALUE" not in out + err


def test_serve_reward_refuses_a_token_no_client_can_send(capsys, monkeypatch):
    from cluster.cli import main
    monkeypatch.setenv("MASKGRPO_REWARD_TOKEN", "two words")
    assert main(["serve-reward"]) == 2
    err = capsys.readouterr().err
    assert "the token is not shown" in err and "two words" not in err


# ---------------------------------------------------------------------------------------------- failures

def test_killed_server_is_a_reward_error_naming_the_url_within_the_timeout(tmp_path, server, token_env):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(server["config"], port)
    wait_healthy(proc, url)
    images, prompts, meta = batch(4)
    remote = build_rewards([{"name": "remote", "url": url, "timeout_s": 2, "retries": 2, "backoff_s": 0.2}])
    remote.score(images, prompts, meta)
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    with pytest.raises(RewardError) as e:
        remote.score(images, prompts, meta)
    assert time.monotonic() - t0 < 3 * 2 + 0.6 + 2
    assert url in str(e.value) and "no answer after 3 tries" in str(e.value) and "\n" not in str(e.value)


def test_a_silent_server_times_out(token_env):
    with socket.socket() as s:        # accepts connections (the kernel's backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        remote = build_rewards([{"name": "remote", "url": url, "timeout_s": 1, "retries": 1, "backoff_s": 0.1}])
        images, prompts, meta = batch(2)
        t0 = time.monotonic()
        with pytest.raises(RewardError, match="no answer after 2 tries.*Timeout"):
            remote.score(images, prompts, meta)
        assert time.monotonic() - t0 < 2 * 1 + 0.1 + 2


def test_a_garbage_answer_is_named(token_env):
    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"scores": [1.0]}' if self.path == "/score" else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        images, prompts, meta = batch(2)
        with pytest.raises(RewardError) as e:
            build_rewards([{"name": "remote", "url": url}]).score(images, prompts, meta)
        assert url in str(e.value) and "answered garbage (scores must be a list of 2 numbers)" in str(e.value)
    finally:
        httpd.shutdown()


def test_the_benchmark_prints_throughput_and_peak_memory_per_body(capsys):
    from benchmarks.bench_reward_server import main
    assert main(["--model", "constant", "--batch", "2", "--size", "32", "--iters", "1", "--rounds", "1",
                 "--memory-mb", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "share:" in out and "# peak memory of the server" in out
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "0.05" and float(row[-1]) >= 0        # body MB, bytes, growth MiB, x body


# ---------------------------------------------------------------------------------------------- training

def _train(config: Path, out: Path, *overrides: str, token: str = TOKEN) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "RAY_DEDUP_LOGS": "0",
           "MASKGRPO_REWARD_TOKEN": token}
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", "--config", str(config),
                             f"output_dir={out}", "max_steps=6", "save_every=1", "eval.at_start=false",
                             "cluster.backend=local", *overrides],                # the client is what is tested
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.integration
@pytest.mark.slow
def test_training_through_a_dripping_reward_server_ends_in_bounded_time_and_resumes(tmp_path):
    """The tiny config trains through `remote` with the same rewards as in-process. Then the server is replaced by
    one that drips its answers a byte every 2 s (issue 32: one try was held 104 s at timeout_s 3): the client gives
    up within (retries + 1) · timeout_s + backoff of the first dripped request, the reward pool's retry does not
    send it again, the run exits 1 with the URL and what the server did in its last line and no token anywhere;
    resume=auto after a restart loses and repeats nothing."""
    tiny = REPO / "configs" / "tiny.yaml"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timeout_s, retries, backoff_s = 3, 1, 0.2
    budget = (retries + 1) * timeout_s + backoff_s
    remote_cfg = tmp_path / "remote.yaml"
    remote_cfg.write_text(json.dumps({"base": str(tiny), "rewards": [
        {"name": "remote", "url": url, "timeout_s": timeout_s, "retries": retries, "backoff_s": backoff_s}]}))

    local = _train(tiny, tmp_path / "local")
    out, err = local.communicate(timeout=600)
    assert local.returncode == 0, err[-3000:]
    reference = _metrics(tmp_path / "local")
    assert [r["step"] for r in reference] == list(range(6))

    server = start_server(tiny, port)           # serves tiny.yaml's rewards: what the local run scored with
    drip = None
    try:
        wait_healthy(server, url)
        run = _train(remote_cfg, tmp_path / "remote")
        deadline = time.monotonic() + 600
        while len(_metrics(tmp_path / "remote")) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        server.kill()
        server.wait()
        answer = http_answer(200, json.dumps({"scores": [0.0] * 64}).encode())
        drip = RawServer(lambda i, head, body: (answer, 2.0, 0), port=port)     # same port: one byte every 2 s
        out, err = run.communicate(timeout=300)
        exited = time.monotonic()
        first = _metrics(tmp_path / "remote")
        assert run.returncode == 1, (out[-2000:], err[-3000:])
        last = err.strip().splitlines()[-1]
        assert url in last and "did not answer in time" in last and "not sent again" in last, last
        assert drip.requests, err[-3000:]
        t0 = drip.requests[0][0]
        assert max(t for t, _, _ in drip.requests) < t0 + budget - 1      # tries only: the pool's retry sent nothing
        print(f"dripping server: {len(drip.requests)} requests, the last cut off {max(drip.ended) - t0:.2f} s and "
              f"the run exited {exited - t0:.2f} s after the first (budget {budget:g} s)")
        assert max(drip.ended) - t0 < budget + 0.5, max(drip.ended) - t0  # every dripping answer cut off in time
        assert exited - t0 < budget + 30, exited - t0                      # and the run ended soon after
        errors_log = (tmp_path / "remote" / "errors.log").read_text()
        assert TOKEN not in out + err + errors_log and url in errors_log
        assert 2 <= len(first) < 6
        for a, b in zip(first, reference):          # the same rewards as in-process, so the same run
            assert (a["step"], a["reward_mean"], a["reward_std"]) == (b["step"], b["reward_mean"], b["reward_std"])
        drip.close()
        drip = None

        server = start_server(tiny, port)
        wait_healthy(server, url)
        again = _train(remote_cfg, tmp_path / "remote", "resume=auto")
        out, err = again.communicate(timeout=600)
        assert again.returncode == 0, err[-3000:]
    finally:
        stop(server)
        if drip is not None:
            drip.close()
    lines = _metrics(tmp_path / "remote")
    assert [r["step"] for r in lines] == list(range(6))                # nothing lost, nothing trained twice
    assert [r["version"] for r in lines] == list(range(1, 7))
    state = json.loads((tmp_path / "remote" / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["step"] == 6
