"""Loopback helpers for tests that start servers (the reward server, a Ray head): a free port, an ASGI app served by
uvicorn in a thread, and a deliberately misbehaving raw HTTP server (answers scripted per request, optionally one
byte at a time) for client tests."""
from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(config: Any, limit_s: float = 30.0) -> Iterator[str]:
    """Run a ``uvicorn.Config`` in a background thread; yields its URL once it listens, stops it afterwards."""
    import uvicorn
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="test-uvicorn")
    thread.start()
    deadline = time.monotonic() + limit_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError(f"uvicorn did not start on {config.host}:{config.port}")
        time.sleep(0.02)
    try:
        yield f"http://{config.host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def http_answer(status: int, body: bytes = b"", headers: Optional[dict] = None) -> bytes:
    """The bytes of an HTTP/1.1 response (Content-Length set, the connection closed after it)."""
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Content-Type: application/json",
            "Connection: close", *[f"{k}: {v}" for k, v in (headers or {}).items()]]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class RawServer:
    """An HTTP server on 127.0.0.1 that misbehaves on purpose. Each connection's request is read (head, then
    Content-Length bytes of body; with `read_body` False the body is never read and the connection held: a slow
    reader), and ``respond(index, head, body)`` says what to do:
    ``(answer_bytes, drip_s, head_bytes)`` sends `head_bytes` of the answer at once and the rest one byte every
    `drip_s` seconds (drip_s 0: all at once); None closes the connection. ``requests`` holds each request's
    (arrival time, head, body); ``ended`` each connection's end (the time the client closed it, or we did)."""

    def __init__(self, respond: Callable[[int, bytes, bytes], Optional[tuple]], read_body: bool = True,
                 port: int = 0):
        self.respond, self.read_body = respond, read_body
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not read_body:                      # small buffers: a client's write blocks after a few hundred KiB
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[tuple[float, bytes, bytes]] = []
        self.ended: list[float] = []
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if self.read_body:
                    while len(body) < length:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        body += chunk
                with self._lock:
                    index = len(self.requests)
                    self.requests.append((time.monotonic(), head, body))
                plan = self.respond(index, head, body)
                if not self.read_body:          # a slow reader: hold the connection, never read the body
                    until = time.monotonic() + 30
                    while not self._closing and time.monotonic() < until:
                        time.sleep(0.05)
                    return
                if plan is None:
                    return
                answer, drip_s, at_once = plan
                conn.sendall(answer[:at_once])
                for i in range(at_once, len(answer)):
                    if drip_s:
                        readable, _, _ = select.select([conn], [], [], drip_s)
                        if readable and not conn.recv(65536):       # the client hung up
                            return
                    conn.sendall(answer[i:i + 1])
            except OSError:
                return
            finally:
                with self._lock:
                    self.ended.append(time.monotonic())

    def close(self) -> None:
        self._closing = True
        self.sock.close()

    def __enter__(self) -> "RawServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
