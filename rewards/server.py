"""The reward server: serves a config's ``rewards`` over HTTP (``maskgrpo serve-reward``; docs/reward_server.md).

FastAPI + uvicorn: one process, one event loop, one decoding thread and one scoring thread, so the models load once
and run one batch at a time, while the loop keeps accepting requests; requests that arrive together are merged into
one model batch (up to ``max_batch`` images) and a larger request is split into model batches. Ray Serve would add
replicas and autoscaling, but it needs a Ray cluster beside every server, and a reward kept where its users keep it
(another machine, another environment, shared by several jobs) is better served by a plain HTTP process that
anything can run, restart and put behind a proxy; several servers behind one load balancer scale the same way.

Endpoints: ``POST /score`` (bearer token; ``Idempotency-Key`` header: a retried request with the same body is
answered from a cache of recent answers instead of being scored again), ``GET /describe`` (bearer token) and
``GET /health`` (open). Everything a client can send is bounded (docs/reward_server.md, "Limits"): the body's bytes
and the time it takes to arrive, the images per request, the requests and connections at once, the headers' size and
the time they take, the cache's entries and bytes. Bad input gets a 4xx with ``{"error": "..."}``, never a 500:
400 not strict JSON or a bad header, 401 no or wrong token, 408 a body too slow, 409 an idempotency key reused for
another body, 413 a body or request too large, 422 a request the protocol or the rewards reject, 429 too much in
flight (with ``Retry-After``). 500 is left for a reward that fails on valid input.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import itertools
import math
import sys
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response

from rewards.base import RewardError, WeightedRewards, build_rewards
from rewards.protocol import (IDEMPOTENCY_HEADER, MAX_KEY_CHARS, PROTOCOL_VERSION, ProtocolError, ScoreBatch, clip,
                              decode_request, dumps, loads_strict, short, utf8)

# raised by rewards for input they cannot score (a 422: the client's request, not the server, is at fault)
INPUT_ERRORS = (ValueError, LookupError, TypeError, AttributeError)
RETRY_AFTER_S = 1                 # what a 429 asks the client to wait
MAX_HEADER_BYTES = 16 << 10       # request line + headers (h11's incomplete-event limit)


@dataclass
class _Job:
    """One model-batch-sized part of a request (a view of its images; ``order`` = (part index, request number)
    makes the batcher take every waiting request's first part before anyone's second)."""
    images: torch.Tensor
    prompts: list
    metadata: list
    future: asyncio.Future
    order: tuple[int, int]
    shape: tuple[int, int] = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(self.images.shape[1:3])
        self.size = int(self.images.shape[0])


@dataclass
class _Entry:
    """A cached answer: the digest of the body it answers, and the answer (bytes) or the scoring still running."""
    digest: str
    task: Optional[asyncio.Future] = None
    data: Optional[bytes] = None


class ScoringError(Exception):
    """A request the rewards failed on: ``status`` 422 (they rejected the input) or 500 (they broke)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class KeyConflict(Exception):
    """An idempotency key already bound to another body (a 409)."""


def _classify(err: BaseException) -> ScoringError:
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    status = 422 if any(isinstance(c, INPUT_ERRORS) and not isinstance(c, RewardError) for c in chain) else 500
    return ScoringError(status, clip(f"{type(err).__name__}: {err}", 300))


class RewardService:
    """The scoring side, independent of HTTP: splits requests into model batches of at most ``max_batch`` images,
    merges queued parts of the same image size into one batch, and caches answers by (idempotency key, body
    digest), at most ``cache_size`` answers and ``cache_bytes`` bytes of them."""

    def __init__(self, rewards: WeightedRewards, max_batch: int = 64, max_wait_ms: float = 5.0,
                 cache_size: int = 1024, cache_bytes: int = 64 << 20):
        self.rewards = rewards
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.cache_size, self.cache_bytes = int(cache_size), int(cache_bytes)
        self._pending: list[_Job] = []
        self._wake: Optional[asyncio.Event] = None
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reward-score")
        self._task: Optional[asyncio.Task] = None
        self._requests = 0
        self.batch_sizes: list[int] = []   # images per model batch, for describe and tests
        self.cache_hits = 0

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._batcher())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------- answers

    async def answer(self, batch: ScoreBatch, key: Optional[str] = None, digest: Optional[str] = None) -> bytes:
        """The JSON answer (bytes) for one request. With `key`, the answer is cached under the key and bound to
        `digest` (of the request's body): the same key and digest again get the first answer without scoring;
        the same key with another digest raises KeyConflict while the first answer is cached."""
        if key is None:
            return await self._answer_bytes(batch)
        entry = self._cache.get(key)
        if entry is not None:
            if entry.digest != digest:
                raise KeyConflict(f"{IDEMPOTENCY_HEADER} {short(key, 40)} was already used for a different body "
                                  f"(SHA-256 {entry.digest[:12]}..., this one {str(digest)[:12]}...): give each "
                                  f"distinct request its own key, e.g. the SHA-256 of its body")
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return entry.data if entry.data is not None else await asyncio.shield(entry.task)
        entry = _Entry(str(digest))
        entry.task = asyncio.get_running_loop().create_task(self._answer_bytes(batch))
        self._cache[key] = entry
        entry.task.add_done_callback(lambda t, k=key, e=entry: self._settle(k, e, t))
        self._evict()
        return await asyncio.shield(entry.task)

    def _settle(self, key: str, entry: _Entry, task: asyncio.Future) -> None:
        """A keyed scoring finished: keep its answer (bytes counted), or forget the key if it failed."""
        if self._cache.get(key) is not entry:
            if not task.cancelled():
                task.exception()          # retrieved: an evicted entry's failure is not "never retrieved"
            return
        if task.cancelled() or task.exception() is not None:
            del self._cache[key]
            return
        entry.data, entry.task = task.result(), None
        self._cached_bytes += len(entry.data)
        self._evict()

    def _evict(self) -> None:
        """Drop the oldest finished answers while the cache holds more than its entries or bytes allow (answers
        still being scored are kept: a retry must find them)."""
        while len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes:
            victim = next((k for k, e in self._cache.items() if e.data is not None), None)
            if victim is None:
                return
            self._cached_bytes -= len(self._cache.pop(victim).data)

    async def _answer_bytes(self, batch: ScoreBatch) -> bytes:
        return dumps(await self.score(batch))

    async def score(self, batch: ScoreBatch) -> dict:
        """Score one request (no cache): its parts of at most ``max_batch`` images are queued, scored (merged with
        other requests' parts where they fit), and joined into one answer."""
        loop = asyncio.get_running_loop()
        self._requests += 1
        n, step = batch.size, self.max_batch
        jobs = [_Job(batch.images[a:a + step], batch.prompts[a:a + step], batch.metadata[a:a + step],
                     loop.create_future(), (i, self._requests)) for i, a in enumerate(range(0, n, step))]
        self._pending += jobs
        self._wake.set()
        try:
            parts = await asyncio.shield(asyncio.gather(*[j.future for j in jobs]))
        except BaseException:
            for j in jobs:                # the request failed (or its waiter went): its other parts need no scoring
                if not j.future.done():
                    j.future.cancel()
            raise
        if len(parts) == 1:
            return parts[0]
        join = lambda lists: list(itertools.chain.from_iterable(lists))   # noqa: E731
        return {"scores": join(p["scores"] for p in parts),
                "components": {k: join(p["components"][k] for p in parts) for k in parts[0]["components"]},
                "details": {k: join(p["details"][k] for p in parts) for k in parts[0]["details"]},
                "weights": parts[0]["weights"]}

    # ------------------------------------------------------------------------------------------- batching

    def _take(self) -> list[_Job]:
        """The first waiting part (every request's first part before any request's second) and the waiting parts
        with its image size, up to max_batch images in all."""
        self._pending = sorted((j for j in self._pending if not j.future.done()), key=lambda j: j.order)
        if not self._pending:
            return []
        first = self._pending[0]
        jobs, total = [first], first.size
        for job in self._pending[1:]:
            if job.shape == first.shape and total + job.size <= self.max_batch:
                jobs.append(job)
                total += job.size
        taken = {id(j) for j in jobs}
        self._pending = [j for j in self._pending if id(j) not in taken]
        return jobs

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self.max_wait_s > 0 and sum(j.size for j in self._pending) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)       # let concurrent requests join this batch
            jobs = self._take()
            if not self._pending:
                self._wake.clear()
            if not jobs:
                continue
            outcomes = await loop.run_in_executor(self._executor, self._score_jobs, jobs)
            for job, outcome in zip(jobs, outcomes):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _score_jobs(self, jobs: Sequence[_Job]) -> list[dict | BaseException]:
        """Score the jobs as one batch; if that fails, each alone (so one bad request fails only itself)."""
        try:
            return self._score_merged(jobs)
        except Exception as e:
            if len(jobs) == 1:
                return [_classify(e)]
        out: list[dict | BaseException] = []
        for job in jobs:
            try:
                out += self._score_merged([job])
            except Exception as e:
                out.append(_classify(e))
        return out

    def _score_merged(self, jobs: Sequence[_Job]) -> list[dict]:
        images = torch.cat([j.images for j in jobs]) if len(jobs) > 1 else jobs[0].images
        prompts = list(itertools.chain.from_iterable(j.prompts for j in jobs))
        metadata = list(itertools.chain.from_iterable(j.metadata for j in jobs))
        out = self.rewards.score(images, prompts, metadata)
        self.batch_sizes.append(len(prompts))
        scores, components, details = out.scores.tolist(), {k: v.tolist() for k, v in out.components.items()}, \
            {k: v.tolist() for k, v in out.details.items()}
        answers, start = [], 0
        for j in jobs:
            a, start = start, start + j.size
            answers.append({"scores": scores[a:start], "components": {k: v[a:start] for k, v in components.items()},
                            "details": {k: v[a:start] for k, v in details.items()}, "weights": dict(out.weights)})
        return answers

    def describe(self) -> dict:
        return {"protocol": PROTOCOL_VERSION, "labels": self.rewards.labels,
                "weights": {label: w for label, w, _ in self.rewards.components}, "max_batch": self.max_batch,
                "image": {"dtype": "uint8", "layout": "[B, H, W, 3]"}, "batches_scored": len(self.batch_sizes),
                "cache_hits": self.cache_hits, "cached_answers": len(self._cache), "cached_bytes": self._cached_bytes}


@dataclass
class Limits:
    """What one client may make the server hold (docs/reward_server.md, "Limits")."""
    max_body_bytes: int = 256 << 20        # a larger body: 413
    max_request_images: int = 1024         # more images in one request: 413
    max_inflight: int = 64                 # /score requests at once (reading, decoding, queued, scoring): else 429
    max_inflight_bytes: int = 1 << 30      # their bodies' bytes at once: else 429
    body_timeout_s: float = 60.0           # the whole body must arrive within this: else 408
    header_timeout_s: float = 10.0         # request line + headers within this (uvicorn protocol below): else closed
    keep_alive_s: float = 5.0              # an idle keep-alive connection is closed after this
    max_connections: int = 256             # connections + requests at once (uvicorn limit_concurrency): else 503


def _error(status: int, message: str, headers: Optional[Mapping[str, str]] = None) -> Response:
    """``{"error": message}``, ASCII-escaped (a lone surrogate in a message can never make it a 500)."""
    return Response(dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=dict(headers or {}))


def _parse(holder: list, key: Optional[str], max_images: int) -> tuple[ScoreBatch, Optional[str]]:
    """(the request, the SHA-256 of its body if it has a key), run in the decoding thread. The body is taken
    out of `holder` and dropped as soon as it is parsed, so a request's memory peaks near twice its body."""
    body = holder.pop()
    digest = hashlib.sha256(body).hexdigest() if key is not None else None
    text = utf8(body)
    del body
    obj = loads_strict(text)
    del text
    return decode_request(obj, max_images), digest


def create_app(service: RewardService, token: str, max_body_bytes: Optional[int] = None,
               limits: Optional[Limits] = None):
    """The FastAPI application serving `service` to clients that present `token` (``Authorization: Bearer``;
    the scheme is case-insensitive)."""
    from contextlib import asynccontextmanager

    if not token:
        raise ValueError("the reward server needs a non-empty bearer token")
    limits = limits or Limits()
    if max_body_bytes is not None:
        limits.max_body_bytes = int(max_body_bytes)
    decoder = ThreadPoolExecutor(1, thread_name_prefix="reward-decode")
    inflight = {"requests": 0, "bytes": 0}

    @asynccontextmanager
    async def lifespan(_app):
        service.start()
        yield
        await service.stop()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="maskgrpo reward server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    expected = token.encode()

    def authorized(request: Request) -> bool:
        scheme, _, credential = request.headers.get("authorization", "").strip().partition(" ")
        return hmac.compare_digest(credential.strip().encode("latin-1"), expected) and scheme.lower() == "bearer"

    def unauthorized() -> Response:
        return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                      {"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": len(service._pending), "inflight": inflight["requests"]}

    @app.get("/describe")
    async def describe(request: Request):
        if not authorized(request):
            return unauthorized()
        return {**service.describe(), "max_body_bytes": limits.max_body_bytes,
                "max_request_images": limits.max_request_images, "max_inflight": limits.max_inflight}

    async def read_body(request: Request, declared: Optional[int]) -> bytearray | Response:
        body = bytearray()
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limits.max_body_bytes:
                        return _error(413, f"body exceeds this server's limit of {limits.max_body_bytes} bytes "
                                           f"(reward_server.max_body_mb): send smaller requests",
                                      {"Connection": "close"})
        except TimeoutError:
            return _error(408, f"the body did not arrive within {limits.body_timeout_s:g} s "
                               f"(reward_server.body_timeout_s)", {"Connection": "close"})
        if declared is not None and len(body) != declared:
            return _error(400, f"the body has {len(body)} bytes, Content-Length said {declared}")
        return body

    @app.post("/score")
    async def score(request: Request):
        if not authorized(request):
            return unauthorized()
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not (0 < len(key) <= MAX_KEY_CHARS):
            return _error(400, f"{IDEMPOTENCY_HEADER} must have 1 to {MAX_KEY_CHARS} characters")
        length = request.headers.get("content-length")
        declared = int(length) if length is not None and length.isascii() and length.isdigit() else None
        if declared is not None and declared > limits.max_body_bytes:
            return _error(413, f"body of {declared} bytes exceeds this server's limit of {limits.max_body_bytes} "
                               f"(reward_server.max_body_mb): send smaller requests", {"Connection": "close"})
        reserve = declared if declared is not None else limits.max_body_bytes
        if inflight["requests"] >= limits.max_inflight or (
                inflight["requests"] and inflight["bytes"] + reserve > limits.max_inflight_bytes):
            return _error(429, f"busy: {inflight['requests']} requests ({inflight['bytes']} body bytes) in flight, "
                               f"the limit is {limits.max_inflight} requests and {limits.max_inflight_bytes} bytes "
                               f"(reward_server.max_inflight, max_inflight_mb); retry after {RETRY_AFTER_S} s",
                          {"Retry-After": str(RETRY_AFTER_S)})
        inflight["requests"] += 1
        inflight["bytes"] += reserve
        try:
            body = await read_body(request, declared)
            if isinstance(body, Response):
                return body
            holder = [body]
            del body
            batch, digest = await asyncio.get_running_loop().run_in_executor(
                decoder, _parse, holder, key, limits.max_request_images)
            data = await service.answer(batch, key, digest)
            return Response(data, media_type="application/json")
        except ProtocolError as e:
            return _error(e.status, str(e))
        except KeyConflict as e:
            return _error(409, str(e))
        except ScoringError as e:
            return _error(e.status, f"the rewards {'rejected' if e.status < 500 else 'failed on'} this request: {e}")
        except Exception as e:
            if type(e).__name__ == "ClientDisconnect":      # starlette's: nobody is left to answer
                return _error(400, "the client disconnected before its body arrived")
            print(f"maskgrpo serve-reward: internal error on /score: {clip(f'{type(e).__name__}: {e}')}\n"
                  f"{traceback.format_exc()}", file=sys.stderr, flush=True)
            return _error(500, f"internal error: {type(e).__name__} (see the server's output)")
        finally:
            inflight["requests"] -= 1
            inflight["bytes"] -= reserve

    return app


def _guarded_h11(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's line and headers: a connection that has not
    sent a complete request head `header_timeout_s` after it opened (or after its last answer) is closed. uvicorn
    has none (its keep-alive timer stops at the first byte), so a client sending headers a byte at a time would
    hold a connection for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def _arm_head_timer(self) -> None:
            old = getattr(self, "_head_timer", None)
            if old is not None:
                old.cancel()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout, self.cycle)

        def _head_timeout(self, waiting_for: Any) -> None:
            # still between requests (no new one began since the timer was armed; the last one answered)
            idle = self.cycle is waiting_for and (self.cycle is None or self.cycle.response_complete)
            if idle and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(specs: Sequence[Mapping[str, Any]], token: str, host: str = "127.0.0.1", port: int = 8377,
          max_batch: int = 64, max_wait_ms: float = 5.0, max_body_mb: float = 256.0, cache_size: int = 1024,
          device: Optional[str] = None, cache_mb: float = 64.0, max_request_images: int = 1024,
          max_inflight: int = 64, max_inflight_mb: float = 1024.0, body_timeout_s: float = 60.0,
          header_timeout_s: float = 10.0, keep_alive_s: float = 5.0, max_connections: int = 256) -> None:
    """Build the rewards (before listening: a reward that cannot load fails here) and serve them until stopped."""
    import uvicorn
    specs = [dict(s) for s in specs]
    if device is not None:
        for s in specs:
            s.setdefault("device", device)
    t0 = time.perf_counter()
    rewards = build_rewards(specs)
    service = RewardService(rewards, max_batch, max_wait_ms, cache_size, int(cache_mb * (1 << 20)))
    limits = Limits(max_body_bytes=int(max_body_mb * (1 << 20)), max_request_images=int(max_request_images),
                    max_inflight=int(max_inflight), max_inflight_bytes=int(max_inflight_mb * (1 << 20)),
                    body_timeout_s=float(body_timeout_s), header_timeout_s=float(header_timeout_s),
                    keep_alive_s=float(keep_alive_s), max_connections=int(max_connections))
    app = create_app(service, token, limits=limits)
    if not is_loopback(host):
        print(f"maskgrpo serve-reward: warning: listening on {host}, not a loopback address: requests, the bearer "
              f"token included, travel in clear HTTP to anyone on the network path; put a TLS proxy in front of it "
              f"(or bind 127.0.0.1 and tunnel)", file=sys.stderr, flush=True)
    print(f"maskgrpo serve-reward: {rewards.labels} loaded in {time.perf_counter() - t0:.1f} s; serving on "
          f"http://{host}:{port} (max_batch {max_batch}, at most {max_request_images} images and "
          f"{max_body_mb:g} MiB a request, {max_inflight} requests in flight)", flush=True)
    uvicorn.Server(uvicorn_config(app, host, port, limits)).run()


def uvicorn_config(app: Any, host: str, port: int, limits: Limits):
    """uvicorn's settings for `app`: the h11 protocol with the header deadline, the connection cap, the keep-alive
    timeout and the header-size limit of `limits`, no access log."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          http=_guarded_h11(limits.header_timeout_s), limit_concurrency=limits.max_connections,
                          timeout_keep_alive=max(1, math.ceil(limits.keep_alive_s)),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)
