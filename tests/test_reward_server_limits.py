"""The reward server's limits and strictness (docs/reward_server.md, "Limits" and "Threat model"), served in-process by
uvicorn in a thread with small limits: idempotency keys bound to the body, the cache bounded in bytes, requests split
into model batches (each request's first part before anyone's second), the per-request image cap, requests in flight,
strict JSON, the bearer scheme, slow headers and bodies, the connection cap, the non-loopback warning, and memory per
request within about twice its body."""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import tracemalloc

import httpx
import pytest
import torch

from rewards.base import Reward, WeightedRewards, build_rewards
from rewards.protocol import IDEMPOTENCY_HEADER, ScoreBatch, encode_request
from rewards.server import Limits, RewardService, _parse, create_app, is_loopback, uvicorn_config
from tests.helpers.net import free_port, serve_in_thread
from tests.test_reward_server import SPECS, TOKEN, batch

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class GateReward(Reward):
    """Scores 1.0, but first waits (up to 10 s) for `gate` to be set: a request held in flight on purpose."""
    gate = threading.Event()

    def _score(self, images, prompts, metadata):
        GateReward.gate.wait(10)
        return torch.ones(images.shape[0])


@pytest.fixture()
def serve():
    """serve(rewards, **limits) -> (url, service): an app on a free port, stopped at the end of the test."""
    stack = []

    def start(rewards=None, max_batch=64, cache_size=1024, cache_bytes=64 << 20, **limits):
        service = RewardService(rewards or build_rewards(SPECS), max_batch=max_batch, max_wait_ms=5,
                                cache_size=cache_size, cache_bytes=cache_bytes)
        lim = Limits(**{"max_body_bytes": 2 << 20, **limits})
        ctx = serve_in_thread(uvicorn_config(create_app(service, TOKEN, limits=lim), "127.0.0.1", free_port(), lim))
        url = ctx.__enter__()
        stack.append(ctx)
        return url, service
    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def body_of(n: int = 2, seed: int = 0) -> bytes:
    return json.dumps(encode_request(*batch(n, seed))).encode()


def post(url: str, body: bytes, headers: dict | None = None, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/score", content=body, headers={**AUTH, **(headers or {})}, timeout=timeout)


def healthy(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=5).status_code == 200


# ---------------------------------------------------------------------------------------------- idempotency, cache

def test_an_idempotency_key_is_bound_to_its_body(serve):
    url, service = serve()
    a, b = body_of(2, seed=1), body_of(3, seed=2)
    first = post(url, a, {IDEMPOTENCY_HEADER: "k-1"})
    assert first.status_code == 200 and len(first.json()["scores"]) == 2
    other = post(url, b, {IDEMPOTENCY_HEADER: "k-1"})           # the issue: B with A's key got A's 2 scores
    assert other.status_code == 409, other.text
    assert "already used for a different body" in other.json()["error"] and "'k-1'" in other.json()["error"]
    again = post(url, a, {IDEMPOTENCY_HEADER: "k-1"})
    assert again.status_code == 200 and again.content == first.content
    assert service.cache_hits == 1 and len(service.batch_sizes) == 1          # scored once
    assert post(url, b, {IDEMPOTENCY_HEADER: "k-2"}).status_code == 200       # a fresh key is fine


def test_the_cache_is_bounded_in_bytes_and_forgets_failures(serve):
    url, service = serve(cache_bytes=1500)
    sizes = []
    for i in range(6):
        resp = post(url, body_of(2, seed=10 + i), {IDEMPOTENCY_HEADER: f"key-{i}"})
        assert resp.status_code == 200
        sizes.append(len(resp.content))
    desc = httpx.get(f"{url}/describe", headers=AUTH).json()
    assert desc["cached_bytes"] <= 1500 and desc["cached_answers"] == 1500 // sizes[0] < 6
    # the oldest went first: key-0's answer is gone, so another body may take the key; the newest is still cached
    assert post(url, body_of(2, seed=99), {IDEMPOTENCY_HEADER: "key-0"}).status_code == 200
    assert post(url, body_of(2, seed=15), {IDEMPOTENCY_HEADER: "key-5"}).status_code == 200
    assert service.cache_hits == 1
    # a request that failed is not cached: its key is free again
    bad = json.loads(body_of(2))
    bad["metadata"] = [{}, {}]                                   # GenEval rejects it (422)
    assert post(url, json.dumps(bad).encode(), {IDEMPOTENCY_HEADER: "key-x"}).status_code == 422
    assert post(url, body_of(2, seed=3), {IDEMPOTENCY_HEADER: "key-x"}).status_code == 200


# ---------------------------------------------------------------------------------------------- sizes and batches

def test_a_request_larger_than_max_batch_is_split_into_model_batches(serve):
    url, service = serve(max_batch=4)
    images, prompts, meta = batch(10, seed=4)
    resp = post(url, json.dumps(encode_request(images, prompts, meta)).encode())
    assert resp.status_code == 200 and service.batch_sizes == [4, 4, 2]
    local = build_rewards(SPECS).score(images, prompts, meta)
    assert resp.json()["scores"] == local.scores.tolist()
    assert resp.json()["details"]["geneval/strict"] == local.details["geneval/strict"].tolist()


def test_a_large_request_does_not_hold_back_a_small_one():
    """Each waiting request's first part is scored before any request's second (max_batch 4: 12 images, then 2)."""
    service = RewardService(build_rewards(SPECS), max_batch=4, max_wait_ms=0)
    finished = []

    async def run():
        service.start()
        try:
            async def one(name, n):
                await service.score(ScoreBatch(*batch(n, seed=n)))
                finished.append(name)
            await asyncio.gather(one("large", 12), one("small", 2))
        finally:
            await service.stop()
    asyncio.run(run())
    assert finished == ["small", "large"] and service.batch_sizes == [4, 2, 4, 4]


def test_too_many_images_in_one_request_is_413_naming_the_limit(serve):
    url, _ = serve(max_request_images=8)
    resp = post(url, body_of(9))
    assert resp.status_code == 413 and "takes at most 8 (reward_server.max_request_images)" in resp.json()["error"]
    assert post(url, body_of(8)).status_code == 200


def test_requests_in_flight_are_capped_with_429_and_retry_after(serve):
    GateReward.gate.clear()
    url, _ = serve(rewards=WeightedRewards([("gate", 1.0, GateReward())]), max_inflight=1, max_connections=8)
    held = {}
    thread = threading.Thread(target=lambda: held.update(resp=post(url, body_of(2))))
    thread.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["inflight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    busy = post(url, body_of(2, seed=1))
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert "the limit is 1 requests" in busy.json()["error"] and "reward_server.max_inflight" in busy.json()["error"]
    GateReward.gate.set()
    thread.join(10)
    assert held["resp"].status_code == 200 and post(url, body_of(2, seed=1)).status_code == 200


def test_body_bytes_in_flight_are_capped(serve):
    GateReward.gate.clear()
    body = body_of(2)
    url, _ = serve(rewards=WeightedRewards([("gate", 1.0, GateReward())]), max_inflight_bytes=len(body) + 10)
    thread = threading.Thread(target=lambda: post(url, body))
    thread.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["inflight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    busy = post(url, body_of(2, seed=1))
    assert busy.status_code == 429 and "max_inflight_mb" in busy.json()["error"]
    GateReward.gate.set()
    thread.join(10)


def test_memory_per_request_stays_near_twice_its_body():
    """The decoding path (UTF-8, JSON, base64) never holds more than about two copies of a 16 MiB body (Python's
    allocations, traced, the body included; the decoded images, a torch tensor of 0.75x the body, come on top)."""
    images = torch.randint(0, 256, (4, 1024, 1024, 3), dtype=torch.uint8)
    encoded = json.dumps(encode_request(images, ["a"] * 4, [{}] * 4)).encode()
    n = len(encoded)
    tracemalloc.start()
    try:
        holder = [bytearray(encoded)]                # the body as the server reads it; the holder owns it
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        parsed, digest = _parse(holder, "k", 16)
        peak = tracemalloc.get_traced_memory()[1] - base + n
    finally:
        tracemalloc.stop()
    assert torch.equal(parsed.images, images) and digest is not None and not holder
    assert peak < 2.2 * n, f"peak {peak / n:.2f}x the body"


# ---------------------------------------------------------------------------------------------- strict input

def _req(mutate) -> bytes:
    obj = encode_request(*batch(2))
    out = mutate(obj)
    return out if isinstance(out, bytes) else json.dumps(obj).encode()


GOOD_DATA = encode_request(*batch(2))["images"]["data"]


@pytest.mark.parametrize("name, body, status, message", [
    ("NaN", lambda o: json.dumps(o).replace('"metadata": [', '"metadata": [{"x": NaN}, ', 1).encode(), 400,
     "NaN is not JSON"),
    ("Infinity", lambda o: json.dumps(o).replace('"prompts"', '"inf": -Infinity, "prompts"').encode(), 400,
     "-Infinity is not JSON"),
    ("overflow", lambda o: json.dumps(o).replace('"prompts"', '"big": 1e999, "prompts"').encode(), 400,
     "is not finite"),
    ("bool size", lambda o: o["images"].update(shape=[True, 64, 64, 3]), 422, "integers"),
    ("float size", lambda o: o["images"].update(shape=[2, 64.0, 64, 3]), 422, "integers"),
    ("huge size", lambda o: o["images"].update(shape=[2, 10 ** 300, 64, 3]), 422, "needs"),
    ("no images", lambda o: o["images"].update(shape=[0, 64, 64, 3]), 422, "at least 1"),
    ("deep JSON", lambda o: b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "too deeply"),
    ("deep metadata", lambda o: o.update(metadata=[{"a": json.loads("[" * 40 + "]" * 40)}, {}]), 422,
     "nests deeper than 16"),
    ("not UTF-8", lambda o: b'{"images": "\xff\xfe"}', 400, "not UTF-8"),
    ("giant int", lambda o: json.dumps(o).replace('"prompts"', '"n": ' + "9" * 5000 + ', "prompts"').encode(),
     400, "not JSON"),
    ("dtype list", lambda o: o["images"].update(dtype=["uint8"] * 1000), 422, "dtype must be 'uint8'"),
    ("bad base64", lambda o: o["images"].update(data="!" * len(GOOD_DATA)), 422, "not valid base64"),
    ("non-ASCII base64", lambda o: o["images"].update(data="\u00e9" * len(GOOD_DATA)), 422, "not valid base64"),
    ("padding inside", lambda o: o["images"].update(data="AA==" + GOOD_DATA[4:]), 422, "not valid base64"),
    ("a list body", lambda o: b"[1, 2]", 422, "must be a JSON object"),
    ("prompts of numbers", lambda o: o.update(prompts=[1, 2]), 422, "prompts must be a list of 2 strings"),
    ("metadata of lists", lambda o: o.update(metadata=[[], []]), 422, "metadata must be a list of 2 JSON objects"),
    ("odd metadata", lambda o: o.update(metadata=[{"tag": 5, "include": "x"}, {"include": [7]}]), 422,
     "the rewards rejected this request"),
    ("long dtype", lambda o: o["images"].update(dtype="u" * 100_000), 422, "dtype must be 'uint8'"),
])
def test_every_malformed_body_is_a_4xx_with_a_short_message(serve, name, body, status, message):
    url, _ = serve()
    resp = post(url, _req(body))
    assert resp.status_code == status, (name, resp.text[:300])
    err = resp.json()["error"]
    assert message in err and len(err) < 400 and "Traceback" not in err, (name, err)
    assert healthy(url)


def test_lone_surrogates_and_odd_unicode_in_prompts_are_fine(serve):
    url, _ = serve()
    body = _req(lambda o: None).replace(b'"prompts": ["', b'"prompts": ["\\ud800\\u0000\xc3\xa9', 1)
    resp = post(url, body)
    assert resp.status_code in (200, 422), resp.text     # scored or rejected by the rewards, never a 500


# ---------------------------------------------------------------------------------------------- HTTP

@pytest.mark.parametrize("value, status", [(f"Bearer {TOKEN}", 200), (f"bearer {TOKEN}", 200),
                                           (f"BEARER   {TOKEN}", 200), (f"Basic {TOKEN}", 401),
                                           (f"Bearer {TOKEN}x", 401), ("Bearer", 401), ("", 401),
                                           (f"Bearer {TOKEN}\u00e9".encode("utf-8"), 401)])
def test_the_bearer_scheme_is_case_insensitive(serve, value, status):
    url, _ = serve()
    resp = httpx.post(f"{url}/score", content=body_of(2), headers={"Authorization": value}, timeout=30)
    assert resp.status_code == status
    if status == 401:
        assert TOKEN not in resp.text and resp.headers["www-authenticate"] == "Bearer"


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_a_client_sending_its_headers_slowly_is_disconnected(serve):
    url, _ = serve(header_timeout_s=1.0)
    with _raw(url) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
        closed = None
        for _ in range(40):                      # one header byte every 0.1 s: never done
            try:
                s.sendall(b"X")
                s.settimeout(0.1)
                if s.recv(100) == b"":
                    closed = time.monotonic() - t0
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = time.monotonic() - t0
                break
        assert closed is not None and 0.9 < closed < 2.0, closed
    assert healthy(url)


def test_a_body_that_does_not_arrive_in_time_is_408(serve):
    url, _ = serve(body_timeout_s=1.0)
    with _raw(url) as s:
        t0 = time.monotonic()
        s.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Length: 100000\r\n\r\n{{\"images\"".encode())
        answer = b""
        while chunk := s.recv(4096):                 # the server closes the connection after its answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer
        assert time.monotonic() - t0 < 2.0
    assert healthy(url)


def test_a_request_head_growing_past_16_kib_is_400(serve):
    """h11 holds at most 16 KiB of an incomplete request head (one read may bring up to 64 KiB more at once)."""
    url, _ = serve()
    with _raw(url) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(20):                  # 20 KiB of one header, 1 KiB a write
                s.sendall(b"X-Padding: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.01)
        except OSError:                          # the server may already have closed the connection
            pass
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert healthy(url)


def test_open_connections_are_capped(serve):
    url, _ = serve(max_connections=4, max_inflight=2, header_timeout_s=5.0)
    idle = [_raw(url) for _ in range(4)]
    time.sleep(0.2)
    try:
        with httpx.Client() as c:
            assert c.get(f"{url}/health").status_code == 503          # uvicorn's limit_concurrency
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert healthy(url)


def test_an_oversized_body_is_413_before_it_is_read(serve):
    url, _ = serve(max_body_bytes=1 << 20)
    resp = post(url, b"x" * (2 << 20))
    assert resp.status_code == 413 and "reward_server.max_body_mb" in resp.json()["error"]


def test_describe_reports_the_limits(serve):
    url, _ = serve(max_request_images=100, max_inflight=7)
    desc = httpx.get(f"{url}/describe", headers=AUTH).json()
    assert desc["max_request_images"] == 100 and desc["max_inflight"] == 7 and desc["max_body_bytes"] == 2 << 20


def test_binding_a_non_loopback_address_warns(monkeypatch, capsys):
    import uvicorn

    from rewards import server
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.5")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    server.serve([{"name": "tests.helpers.rewards:ConstantReward"}], TOKEN, host="0.0.0.0", port=free_port())
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0, not a loopback address" in err and "TLS proxy" in err
    assert TOKEN not in err
    server.serve([{"name": "tests.helpers.rewards:ConstantReward"}], TOKEN, host="127.0.0.1", port=free_port())
    assert "warning" not in capsys.readouterr().err


def test_base64_of_a_shape_is_checked_before_decoding(serve):
    """A body claiming a huge image with little data is refused from the lengths alone."""
    url, _ = serve()
    resp = post(url, _req(lambda o: o["images"].update(shape=[2, 60000, 60000, 3])))
    assert resp.status_code == 422 and "holds" in resp.json()["error"]
    data = base64.b64encode(b"\0" * 48).decode()
    resp = post(url, _req(lambda o: o["images"].update(shape=[1, 4, 4, 3], data=data) or o.update(
        prompts=["p"], metadata=[{}])))
    assert resp.status_code in (200, 422) and healthy(url)
