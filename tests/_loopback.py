"""Helpers the tests share: an ASGI app served by uvicorn on a free loopback port, and waiting for a tool
call's record."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Uvicorn:
    """An ASGI app served by uvicorn on a thread (a real HTTP server on 127.0.0.1)."""

    def __init__(self, app, log_level: str = "warning"):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 60 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def serve_on_loopback(app):
    """Serve ``app`` (an MCP server's ``streamable_http_app()`` or any ASGI app) on 127.0.0.1; yield the port."""
    srv = Uvicorn(app, log_level="error")
    try:
        yield srv.port
    finally:
        srv.stop()


def wait(session, pending, deadline: float = 60.0):
    """The record of a submitted call, polled as the engine polls it."""
    t0 = time.perf_counter()
    while (rec := session.poll(pending)) is None:
        assert time.perf_counter() - t0 < deadline
        time.sleep(0.005)
    return rec


def call(session, name: str, args: dict, *, deadline: float = 60.0):
    """Submit one call and wait for its record."""
    return wait(session, session.submit(name, json.dumps(args)), deadline)
