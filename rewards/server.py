"""The reward server: serves a config's ``rewards`` over HTTP (``maskgrpo serve-reward``; docs/reward_server.md).

FastAPI + uvicorn: one process, one event loop and one scoring thread, so the models load once and run one batch
at a time, while the loop keeps accepting requests; requests that arrive together are merged into one model
batch (up to ``max_batch`` images). Ray Serve would add replicas and autoscaling, but it needs a Ray cluster
beside every server, and a reward kept where its users keep it (another machine, another environment, shared by
several jobs) is better served by a plain HTTP process that anything can run, restart and put behind a proxy;
several servers behind one load balancer scale the same way.

Endpoints: ``POST /score`` (bearer token; ``Idempotency-Key`` header: a retried request is answered from a cache
of recent answers instead of being scored again), ``GET /describe`` (bearer token) and ``GET /health`` (open).
Bad input gets a 4xx with ``{"error": "..."}``: 400 malformed JSON, 401 no or wrong token, 413 body too large,
422 a request the protocol or the rewards reject (wrong image dtype or shape, missing metadata, ...).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rewards.base import RewardError, WeightedRewards, build_rewards
from rewards.protocol import (IDEMPOTENCY_HEADER, MAX_KEY_CHARS, PROTOCOL_VERSION, ProtocolError, ScoreBatch,
                              decode_request, encode_answer)

INPUT_ERRORS = (ValueError, KeyError, TypeError)   # raised by rewards for input they cannot score


@dataclass
class _Job:
    batch: ScoreBatch
    future: asyncio.Future
    shape: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(self.batch.images.shape[1:3])


class ScoringError(Exception):
    """A request the rewards failed on: ``status`` 422 (they rejected the input) or 500 (they broke)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _classify(err: BaseException) -> ScoringError:
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    status = 422 if any(isinstance(c, INPUT_ERRORS) and not isinstance(c, RewardError) for c in chain) else 500
    return ScoringError(status, f"{type(err).__name__}: {err}".splitlines()[0])


class RewardService:
    """The scoring side, independent of HTTP: merges queued requests into batches and caches answers by key."""

    def __init__(self, rewards: WeightedRewards, max_batch: int = 64, max_wait_ms: float = 5.0,
                 cache_size: int = 1024):
        self.rewards = rewards
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.cache_size = int(cache_size)
        self._pending: list[_Job] = []
        self._wake: Optional[asyncio.Event] = None
        self._cache: OrderedDict[str, asyncio.Future] = OrderedDict()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reward-score")
        self._task: Optional[asyncio.Task] = None
        self.batch_sizes: list[int] = []   # images per model batch, for describe and tests
        self.cache_hits = 0

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._batcher())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, batch: ScoreBatch, key: Optional[str] = None) -> dict:
        """The answer for one request; with `key`, a repeated key gets the first request's answer."""
        if key is not None:
            known = self._cache.get(key)
            if known is not None and not (known.done() and known.exception() is not None):
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return await asyncio.shield(known)
        fut = asyncio.get_running_loop().create_future()
        if key is not None:
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._pending.append(_Job(batch, fut))
        self._wake.set()
        return await asyncio.shield(fut)

    def _take(self) -> list[_Job]:
        """The oldest job and the queued jobs with its image size, up to max_batch images in all."""
        first = self._pending[0]
        jobs, total = [first], first.batch.size
        for job in self._pending[1:]:
            if job.shape == first.shape and total + job.batch.size <= self.max_batch:
                jobs.append(job)
                total += job.batch.size
        taken = {id(j) for j in jobs}
        self._pending = [j for j in self._pending if id(j) not in taken]
        return jobs

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self.max_wait_s > 0 and sum(j.batch.size for j in self._pending) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)       # let concurrent requests join this batch
            jobs = self._take()
            if not self._pending:
                self._wake.clear()
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
        images = torch.cat([j.batch.images for j in jobs]) if len(jobs) > 1 else jobs[0].batch.images
        prompts = [p for j in jobs for p in j.batch.prompts]
        metadata = [m for j in jobs for m in j.batch.metadata]
        out = self.rewards.score(images, prompts, metadata)
        self.batch_sizes.append(len(prompts))
        answers, start = [], 0
        for j in jobs:
            sl = slice(start, start + j.batch.size)
            start += j.batch.size
            answers.append(encode_answer(out.scores[sl], {k: v[sl] for k, v in out.components.items()},
                                         {k: v[sl] for k, v in out.details.items()}, out.weights))
        return answers

    def describe(self) -> dict:
        return {"protocol": PROTOCOL_VERSION, "labels": self.rewards.labels,
                "weights": {label: w for label, w, _ in self.rewards.components}, "max_batch": self.max_batch,
                "image": {"dtype": "uint8", "layout": "[B, H, W, 3]"}, "batches_scored": len(self.batch_sizes),
                "cache_hits": self.cache_hits}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(service: RewardService, token: str, max_body_bytes: int = 256 << 20):
    """The FastAPI application serving `service` to clients that present `token`."""
    from contextlib import asynccontextmanager

    if not token:
        raise ValueError("the reward server needs a non-empty bearer token")

    @asynccontextmanager
    async def lifespan(_app):
        service.start()
        yield
        await service.stop()

    app = FastAPI(title="maskgrpo reward server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    expected = f"Bearer {token}".encode()

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": len(service._pending)}

    @app.get("/describe")
    async def describe(request: Request):
        if not authorized(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return {**service.describe(), "max_body_bytes": max_body_bytes}

    @app.post("/score")
    async def score(request: Request):
        if not authorized(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return _error(413, f"body of {int(declared)} bytes exceeds this server's limit of {max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return _error(413, f"body exceeds this server's limit of {max_body_bytes} bytes")
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not (0 < len(key) <= MAX_KEY_CHARS):
            return _error(400, f"{IDEMPOTENCY_HEADER} must have 1 to {MAX_KEY_CHARS} characters")
        try:
            obj = json.loads(body)
        except ValueError as e:
            return _error(400, f"the body is not JSON: {e}")
        try:
            batch = decode_request(obj)
        except ProtocolError as e:
            return _error(422, str(e))
        try:
            answer = await service.score(batch, key)
        except ScoringError as e:
            return _error(e.status, f"the rewards {'rejected' if e.status < 500 else 'failed on'} this request: {e}")
        return JSONResponse(answer)

    return app


def serve(specs: Sequence[Mapping[str, Any]], token: str, host: str = "127.0.0.1", port: int = 8377,
          max_batch: int = 64, max_wait_ms: float = 5.0, max_body_mb: float = 256.0, cache_size: int = 1024,
          device: Optional[str] = None) -> None:
    """Build the rewards (before listening: a reward that cannot load fails here) and serve them until stopped."""
    import uvicorn
    specs = [dict(s) for s in specs]
    if device is not None:
        for s in specs:
            s.setdefault("device", device)
    t0 = time.perf_counter()
    rewards = build_rewards(specs)
    service = RewardService(rewards, max_batch, max_wait_ms, cache_size)
    app = create_app(service, token, int(max_body_mb * (1 << 20)))
    print(f"maskgrpo serve-reward: {rewards.labels} loaded in {time.perf_counter() - t0:.1f} s; serving on "
          f"http://{host}:{port} (max_batch {max_batch})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
