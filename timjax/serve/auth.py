"""The API key: ``Authorization: Bearer KEY`` (OpenAI, Runs) or ``x-api-key: KEY`` (Anthropic), compared in
constant time (``hmac.compare_digest``) so the comparison leaks nothing about the key."""

from __future__ import annotations

import hmac

from fastapi import Request

from timjax.serve.errors import ApiError


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def require_key(request: Request) -> None:
    """FastAPI dependency of every /v1 route."""
    expected = request.app.state.config.api_key
    if expected is None:
        return
    got = presented_key(request)
    if got is None or not hmac.compare_digest(got.encode("utf-8"), expected.encode("utf-8")):
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY, or x-api-key: KEY)")
