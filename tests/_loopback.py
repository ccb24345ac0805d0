"""Helpers the tool tests share: an ASGI app served by uvicorn on a free loopback port, and waiting for a
tool call's record."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time


@contextlib.contextmanager
def serve_on_loopback(app):
    """Serve ``app`` (an MCP server's ``streamable_http_app()`` or any ASGI app) on 127.0.0.1; yield the port."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    while not server.started:
        assert time.perf_counter() - t0 < 30, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait(session, pending, deadline: float = 30.0):
    """The record of a submitted call, polled as the engine polls it."""
    t0 = time.perf_counter()
    while (rec := session.poll(pending)) is None:
        assert time.perf_counter() - t0 < deadline
        time.sleep(0.005)
    return rec


def call(session, name: str, args: dict, *, deadline: float = 30.0):
    """Submit one call and wait for its record."""
    return wait(session, session.submit(name, json.dumps(args)), deadline)
