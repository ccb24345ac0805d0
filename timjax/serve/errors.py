"""API errors, each rendered in the error shape of the route that raised it (OpenAI, Anthropic, Runs), so
the official clients raise their own typed errors; the server goes on serving."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# status -> (OpenAI type, Anthropic type, Runs code)
_KINDS = {
    400: ("invalid_request_error", "invalid_request_error", "invalid_request"),
    401: ("authentication_error", "authentication_error", "authentication_failed"),
    403: ("permission_error", "permission_error", "permission_denied"),
    404: ("not_found_error", "not_found_error", "not_found"),
    405: ("invalid_request_error", "invalid_request_error", "invalid_request"),
    413: ("invalid_request_error", "request_too_large", "invalid_request"),
    429: ("rate_limit_error", "rate_limit_error", "rate_limited"),
    503: ("server_error", "overloaded_error", "service_unavailable"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def route_family(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/runs"):
        return "runs"
    return "openai"


def error_body(family: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    oa, an, runs = _KINDS.get(status, ("server_error", "api_error", "internal_error"))
    if family == "anthropic":
        return {"type": "error", "error": {"type": an, "message": message}}
    if family == "runs":
        return {"error": {"code": code or runs, "message": message}}
    return {"error": {"message": message, "type": oa, "param": param, "code": code}}


def error_response(request: Request, status: int, message: str, *, param=None, code=None, headers=None):
    body = error_body(route_family(request.url.path), status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def _field(loc) -> str:
    parts = [str(x) for x in loc if x != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def install(app) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request, e.status, e.message, param=e.param, code=e.code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid body"}
        if err.get("type") == "json_invalid":
            return error_response(request, 400, f"the body is not valid JSON: {err.get('msg')}", param="body")
        field = _field(err.get("loc", ()))
        return error_response(request, 400, f"invalid {field}: {err.get('msg')}", param=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(request, e.status_code, str(e.detail), headers=getattr(e, "headers", None))
