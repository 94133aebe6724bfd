"""The ``remote`` reward: scores through a reward server (``maskgrpo serve-reward``; docs/reward_server.md).

    rewards:
      - {name: remote, url: "http://10.0.0.5:8377", token_env: MASKGRPO_REWARD_TOKEN, timeout_s: 30,
         max_concurrency: 4, retries: 2, weight: 1.0}

Its score is the server's weighted total; the server's per-reward components and details are logged as this
reward's details (``remote/geneval``, ``remote/geneval/strict``). Each request carries an idempotency key, the
SHA-256 of its body: a request sent again (after a timeout, or by the reward pool's retry) is answered from the
server's cache instead of being scored twice.

Every wait is bounded by deadlines, not by per-read timeouts: each try of a request has ``timeout_s`` for all of it
(connecting, sending the body, the answer's head and every byte of its body: a server that drips its answer a byte
at a time is cut off at the deadline), and a request with its retries has ``(retries + 1) · timeout_s`` plus the
backoff (``backoff_s · (1 + 2 + ...)``) in all, sent again by anyone in this process (the reward pool's retry)
within that window or not. Then, or at once for an answer that can never succeed (any 4xx but 408/429, an answer
that is not the protocol), it raises RewardError with one line naming the URL and what the server did. The bearer
token is read from the environment, stripped like the server strips it, and never appears in a message.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Optional

import torch

from rewards.base import Reward, RewardError, RewardOutput, register_reward
from rewards.protocol import IDEMPOTENCY_HEADER, ProtocolError, clip, decode_answer, encode_request, loads_strict

RETRY_STATUS = {408, 429, 500, 502, 503, 504}   # answers worth another try; any other 4xx is final
ANSWER_BYTES_PER_IMAGE = 64 << 10                # a larger answer is refused (a server cannot fill our memory)

_try = threading.local()      # the deadline of the try running on this thread, and the answer bytes it received
# (url, body digest) -> (until when, how its budget ran out): requests whose whole budget just ran out, so that the
# reward pool's retry of the same call in this process (any reward actor of a local backend) is not sent again
_spent: dict[tuple[str, str], tuple[float, str]] = {}
_spent_lock = threading.Lock()


def _left(timeout: Optional[float], expired: type[Exception]) -> Optional[float]:
    """The time an I/O operation may take: its own timeout, cut to what is left of the try's deadline."""
    deadline = getattr(_try, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired(f"the try's deadline of {_try.budget:g} s passed")
    return left if timeout is None else min(timeout, left)


def _deadline_backend():
    """An httpcore network backend whose every connect, read and write is cut to the running try's deadline, so
    no sequence of slow-but-not-silent operations (a dripping server, a slow reader of our body) extends a try."""
    import httpcore

    class DeadlineStream(httpcore.NetworkStream):
        def __init__(self, inner: Any):
            self._inner = inner

        def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
            data = self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))
            _try.received = getattr(_try, "received", 0) + len(data)
            return data

        def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
            sock, view = self._inner.get_extra_info("socket"), memoryview(buffer)
            while view:                  # each send gets what is left of the deadline, not a fresh timeout
                left = _left(timeout, httpcore.WriteTimeout)
                try:
                    sock.settimeout(left)
                    sent = sock.send(view)
                except socket.timeout:
                    raise httpcore.WriteTimeout(f"could not send the body within {left:.3g} s") from None
                except OSError as e:
                    raise httpcore.WriteError(str(e)) from None
                view = view[sent:]

        def close(self) -> None:
            self._inner.close()

        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            return DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                        _left(timeout, httpcore.ConnectTimeout)))

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class DeadlineBackend(httpcore.NetworkBackend):
        def __init__(self):
            self._inner = httpcore.SyncBackend()

        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            return DeadlineStream(self._inner.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                          local_address, socket_options))

        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            return DeadlineStream(self._inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                                  socket_options))

        def sleep(self, seconds: float) -> None:
            self._inner.sleep(seconds)

    return DeadlineBackend()


def _answered(status: int, body: bytes) -> str:
    """What a server answered, in a few words: its status and its error message (or the start of the body)."""
    try:
        msg = json.loads(body).get("error")
    except Exception:
        msg = None
    text = clip(msg if isinstance(msg, str) else body[:200].decode("utf-8", "replace").replace("\n", " "), 240)
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def _retry_after(headers: list) -> float:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return 0.0


class _Gave:
    """How the last try of a request ended, for the final message: `kind` is refused | connect | slow | closed |
    status | busy."""

    def __init__(self, kind: str, text: str):
        self.kind, self.text = kind, text


@register_reward("remote")
class RemoteReward(Reward):
    """A reward scored by a reward server at `url` (see the module doc).

    `token_env`: the environment variable holding the server's bearer token (never the token itself in a config);
    `timeout_s`: the deadline of each try (connect, send, the whole answer); `max_concurrency`: requests in flight
    at once; `request_size`: images per request (a batch is split, the parts sent concurrently); `retries`: extra
    tries after a connection failure, a timeout or a 5xx/408, `backoff_s` apart, doubling (a 429 is waited out as
    its Retry-After says, within the request's deadline, without spending a try). `device` is ignored."""

    def __init__(self, url: str, token_env: str = "MASKGRPO_REWARD_TOKEN", timeout_s: float = 30.0,
                 max_concurrency: int = 4, retries: int = 2, backoff_s: float = 0.5, request_size: int = 64,
                 device: Optional[str] = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got {url!r}")
        token = os.environ.get(token_env, "").strip()          # as the server strips it
        if not token:
            raise ValueError(f"remote reward {url}: environment variable {token_env} is not set; export the "
                             f"server's bearer token there (on every node that runs reward actors)")
        bad = next((i for i, c in enumerate(token) if not "!" <= c <= "~"), None)
        if bad is not None:
            raise ValueError(f"remote reward {url}: environment variable {token_env} holds a character that cannot "
                             f"go in an HTTP header (a space, control or non-ASCII character at position {bad} of "
                             f"{len(token)}; the token is not shown): set it to the server's token alone")
        if timeout_s <= 0 or max_concurrency < 1 or retries < 0 or backoff_s < 0 or request_size < 1:
            raise ValueError("remote reward: timeout_s > 0, max_concurrency >= 1, retries >= 0, backoff_s >= 0 and "
                             "request_size >= 1 are required")
        self.url = url.rstrip("/")
        self._token = token
        self._headers = [(b"Authorization", f"Bearer {token}".encode("ascii")),
                         (b"Content-Type", b"application/json")]
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.max_concurrency, self.request_size = int(max_concurrency), int(request_size)
        self._client = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    @property
    def budget_s(self) -> float:
        """The most one request may take with all its tries: (retries + 1) · timeout_s + backoff."""
        return (self.retries + 1) * self.timeout_s + self.backoff_s * (2 ** self.retries - 1)

    def __getstate__(self) -> dict:     # the HTTP client and threads are made again where it is unpickled
        return {**self.__dict__, "_client": None, "_pool": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _http(self):
        import httpcore
        with self._lock:
            if self._client is None:
                self._client = httpcore.ConnectionPool(max_connections=self.max_concurrency,
                                                       network_backend=_deadline_backend())
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="remote-reward")
        return self._client

    def _fail(self, message: str) -> RewardError:
        message = message.replace(self._token, "<token>")   # never in a message, whatever a server echoes
        return RewardError(self.name, f"remote reward {self.name!r} at {self.url}: {message}")

    def _once(self, method: str, path: str, body: Optional[bytes], headers: list, deadline: float,
              max_answer: int) -> tuple[int, list, bytes]:
        """One try: (status, headers, answer body), everything within `deadline`; httpcore errors propagate."""
        import httpcore
        client = self._http()
        _try.deadline, _try.budget, _try.received = deadline, self.timeout_s, 0
        t = max(deadline - time.monotonic(), 1e-3)
        try:
            with client.stream(method, f"{self.url}{path}", headers=headers, content=body,
                               extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}}) as resp:
                chunks, size = [], 0
                for chunk in resp.iter_stream():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > max_answer:
                        raise ProtocolError(f"an answer of more than {max_answer} bytes")
                    if time.monotonic() > deadline:
                        raise httpcore.ReadTimeout(f"the try's deadline of {self.timeout_s:g} s passed")
                return resp.status, resp.headers, b"".join(chunks)
        finally:
            _try.deadline = None

    @staticmethod
    def _classify(e: Exception, received: int, timeout_s: float) -> _Gave:
        import httpcore
        name = type(e).__name__
        if isinstance(e, httpcore.ConnectError):
            return _Gave("refused", f"{name}: {clip(str(e), 120)}" if str(e) else name)
        if isinstance(e, httpcore.ConnectTimeout):
            return _Gave("connect", f"{name}: could not connect within {timeout_s:g} s")
        if isinstance(e, httpcore.TimeoutException):
            what = "sent nothing back" if not received else \
                f"had sent {received} byte{'s' if received > 1 else ''} of its answer"
            return _Gave("slow", f"{name}: the answer was not complete within {timeout_s:g} s (the server {what})")
        return _Gave("closed", f"{name}: {clip(str(e), 120)}" if str(e) else name)

    def _give_up(self, tries: int, gave: _Gave) -> str:
        t = f"{self.timeout_s:g} s"
        if gave.kind == "status":
            return (f"the server answered an error on every try ({tries} tries within {t} each; last: {gave.text}): "
                    f"it is running but failing on this request; see the server's output")
        if gave.kind == "busy":
            return (f"the server stayed busy for the request's whole {self.budget_s:g} s (last: {gave.text}): "
                    f"raise the server's reward_server.max_inflight, lower this reward's max_concurrency, or run "
                    f"more servers")
        hint = {"refused": "is the server running?",
                "connect": "is the host reachable (a firewall dropping packets)?",
                "slow": "the server took the request but did not answer in time: stalled, overloaded, or scoring "
                        "slower than timeout_s allows",
                "closed": "the server closed the connection: did it crash or restart?"}[gave.kind]
        return f"no answer after {tries} tries within {t} each (last: {gave.text}); {hint}"

    def _post(self, body: bytes, batch: int) -> tuple[torch.Tensor, dict, dict]:
        import httpcore
        digest = hashlib.sha256(body).hexdigest()
        start = time.monotonic()
        with _spent_lock:
            for k in [k for k, (until, _) in _spent.items() if until < start]:
                del _spent[k]
            spent = _spent.get((self.url, digest))
        if spent is not None:      # the pool's retry of a request whose whole budget just ran out: not again
            raise self._fail(f"{spent[1]} [this request already had its {self.budget_s:g} s; not sent again]")
        call_deadline = start + self.budget_s
        headers = [*self._headers, (IDEMPOTENCY_HEADER.encode(), digest.encode())]
        tries, gave = 0, None
        while True:
            if gave is not None and gave.kind != "busy":        # a failed try: another after the backoff, if left
                if tries > self.retries:
                    break
                time.sleep(max(0.0, min(self.backoff_s * 2 ** (tries - 1), call_deadline - time.monotonic())))
            if gave is None or gave.kind != "busy":
                tries += 1
            try_deadline = min(time.monotonic() + self.timeout_s, call_deadline)
            if try_deadline - time.monotonic() <= 0:
                break
            try:
                status, resp_headers, answer = self._once("POST", "/score", body, headers, try_deadline,
                                                          max(1 << 20, ANSWER_BYTES_PER_IMAGE * batch))
            except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, OSError) as e:
                gave = self._classify(e, getattr(_try, "received", 0), self.timeout_s)
                continue
            except ProtocolError as e:
                raise self._fail(f"answered garbage ({e})") from None
            if status == 429:        # busy: wait as it asks (within the deadline), without spending a try
                gave = _Gave("busy", _answered(status, answer))
                time.sleep(max(0.05, min(_retry_after(resp_headers), call_deadline - time.monotonic())))
                continue
            if status in RETRY_STATUS:
                gave = _Gave("status", _answered(status, answer))
                continue
            if status != 200:
                raise self._fail(f"answered {_answered(status, answer)}")
            try:
                return decode_answer(loads_strict(answer), batch)
            except ProtocolError as e:
                raise self._fail(f"answered garbage ({e}): {answer[:120]!r}") from None
        message = self._give_up(tries, gave)
        with _spent_lock:
            _spent[(self.url, digest)] = (time.monotonic() + self.budget_s, message)
        raise self._fail(message)

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        self._http()
        parts = [(i, min(i + self.request_size, len(prompts))) for i in range(0, len(prompts), self.request_size)]
        try:
            bodies = [json.dumps(encode_request(images[a:b], prompts[a:b], metadata[a:b]), allow_nan=False).encode()
                      for a, b in parts]
        except (TypeError, ValueError) as e:
            raise ValueError(f"remote reward: per-sample metadata must be JSON-serialisable (finite numbers): "
                             f"{e}") from None
        futures = [self._pool.submit(self._post, body, b - a) for body, (a, b) in zip(bodies, parts)]
        # a bound over the whole call as well (each request already keeps its own): queued parts wait their turn
        bound = math.ceil(len(parts) / self.max_concurrency) * self.budget_s + 2.0
        done, pending = wait(futures, timeout=bound, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            raise failed.exception()
        if pending:
            raise self._fail(f"no answer to {len(pending)} of {len(parts)} requests within {bound:g} s")
        answers = [f.result() for f in futures]
        scores = torch.cat([a[0] for a in answers])
        details = {}
        for key in answers[0][1]:
            details[key] = torch.cat([a[1][key] for a in answers])
        for key in answers[0][2]:
            details[key] = torch.cat([a[2][key] for a in answers])
        return RewardOutput(scores=scores, details=details)

    def describe(self) -> dict:
        """The server's description (labels, weights, limits): GET /describe, within one try's deadline."""
        import httpcore
        try:
            status, _, answer = self._once("GET", "/describe", None, self._headers[:1],
                                           time.monotonic() + self.timeout_s, 1 << 20)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, OSError) as e:
            raise self._fail(f"no answer to /describe ({self._classify(e, 0, self.timeout_s).text})") from None
        except ProtocolError as e:
            raise self._fail(f"answered garbage to /describe ({e})") from None
        if status != 200:
            raise self._fail(f"answered {_answered(status, answer)} to /describe")
        try:
            return loads_strict(answer)
        except ProtocolError as e:
            raise self._fail(f"answered garbage to /describe ({e})") from None
