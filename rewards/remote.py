"""The ``remote`` reward: scores through a reward server (``maskgrpo serve-reward``; docs/reward_server.md).

    rewards:
      - {name: remote, url: "http://10.0.0.5:8377", token_env: MASKGRPO_REWARD_TOKEN, timeout_s: 30,
         max_concurrency: 4, retries: 2, weight: 1.0}

Its score is the server's weighted total; the server's per-reward components and details are logged as this
reward's details (``remote/geneval``, ``remote/geneval/strict``). Each request carries an idempotency key, the
SHA-256 of its body: a request sent again (after a timeout, or by the reward pool's retry on another actor) is
answered from the server's cache instead of being scored twice. Every wait is bounded: a call takes at most
``(retries + 1) · timeout_s`` plus the backoff (``backoff_s · (1 + 2 + ...)``); then, or at once for an answer
that can never succeed (4xx, garbage), it raises RewardError with one line naming the URL and what it answered.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch

from rewards.base import Reward, RewardError, RewardOutput, register_reward
from rewards.protocol import IDEMPOTENCY_HEADER, ProtocolError, decode_answer, encode_request

RETRY_STATUS = {408, 429, 500, 502, 503, 504}   # answers worth another try; any other 4xx is final


def _answered(resp: Any) -> str:
    """What a server answered, in a few words: its status and its error message (or the start of the body)."""
    try:
        msg = resp.json().get("error")
    except Exception:
        msg = None
    text = msg if isinstance(msg, str) else resp.text[:200].replace("\n", " ")
    return f"HTTP {resp.status_code}: {text}" if text else f"HTTP {resp.status_code}"


@register_reward("remote")
class RemoteReward(Reward):
    """A reward scored by a reward server at `url` (see the module doc).

    `token_env`: the environment variable holding the server's bearer token (never the token itself in a config);
    `timeout_s`: bound on connecting, sending and each wait for the answer; `max_concurrency`: requests in flight
    at once; `request_size`: images per request (a batch is split, the parts sent concurrently); `retries`: extra
    tries after a connection failure, a timeout or a 5xx/429, `backoff_s` apart, doubling. `device` is ignored."""

    def __init__(self, url: str, token_env: str = "MASKGRPO_REWARD_TOKEN", timeout_s: float = 30.0,
                 max_concurrency: int = 4, retries: int = 2, backoff_s: float = 0.5, request_size: int = 64,
                 device: Optional[str] = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got {url!r}")
        token = os.environ.get(token_env, "")
        if not token:
            raise ValueError(f"remote reward {url}: environment variable {token_env} is not set; export the "
                             f"server's bearer token there (on every node that runs reward actors)")
        if timeout_s <= 0 or max_concurrency < 1 or retries < 0 or backoff_s < 0 or request_size < 1:
            raise ValueError("remote reward: timeout_s > 0, max_concurrency >= 1, retries >= 0, backoff_s >= 0 and "
                             "request_size >= 1 are required")
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.max_concurrency, self.request_size = int(max_concurrency), int(request_size)
        self._client = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:     # the HTTP client and threads are made again where it is unpickled
        return {**self.__dict__, "_client": None, "_pool": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _http(self):
        import httpx
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=httpx.Timeout(self.timeout_s),
                                            limits=httpx.Limits(max_connections=self.max_concurrency))
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="remote-reward")
        return self._client

    def _fail(self, message: str) -> RewardError:
        return RewardError(self.name, f"remote reward {self.name!r} at {self.url}: {message}")

    def _post(self, body: bytes, batch: int) -> tuple[torch.Tensor, dict, dict]:
        import httpx
        client = self._http()
        headers = {**self._headers, IDEMPOTENCY_HEADER: hashlib.sha256(body).hexdigest()}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = client.post(f"{self.url}/score", content=body, headers=headers)
            except httpx.HTTPError as e:   # refused, reset, timed out: the server may come back
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if resp.status_code in RETRY_STATUS:
                last = _answered(resp)
                continue
            if resp.status_code != 200:
                raise self._fail(f"answered {_answered(resp)}")
            try:
                return decode_answer(resp.json(), batch)
            except (ValueError, ProtocolError) as e:
                raise self._fail(f"answered garbage ({e}): {resp.text[:120]!r}") from None
        raise self._fail(f"no answer after {self.retries + 1} tries within {self.timeout_s:g} s each "
                         f"(last: {last}); is the server running?")

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        self._http()
        parts = [(i, min(i + self.request_size, len(prompts))) for i in range(0, len(prompts), self.request_size)]
        try:
            bodies = [json.dumps(encode_request(images[a:b], prompts[a:b], metadata[a:b])).encode() for a, b in parts]
        except TypeError as e:
            raise ValueError(f"remote reward: per-sample metadata must be JSON-serialisable: {e}") from None
        answers = list(self._pool.map(lambda ab: self._post(ab[0], ab[1][1] - ab[1][0]), zip(bodies, parts)))
        scores = torch.cat([a[0] for a in answers])
        details = {}
        for key in answers[0][1]:
            details[key] = torch.cat([a[1][key] for a in answers])
        for key in answers[0][2]:
            details[key] = torch.cat([a[2][key] for a in answers])
        return RewardOutput(scores=scores, details=details)

    def describe(self) -> dict:
        """The server's description (labels, weights, limits): GET /describe."""
        resp = self._http().get(f"{self.url}/describe", headers=self._headers)
        if resp.status_code != 200:
            raise self._fail(f"answered {_answered(resp)} to /describe")
        return resp.json()
