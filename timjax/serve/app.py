"""The ASGI app: ``create_app(ServeConfig)`` loads the model, starts the open engine's loop thread (``backend.py``) and
the server-level tools, and mounts the OpenAI, Anthropic and Runs routes, ``/health`` and ``/metrics``."""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from timjax.serve import anthropic, errors, openai, runs
from timjax.serve.config import ServeConfig
from timjax.serve.errors import error_response
from timjax.serve.metrics import Metrics

log = logging.getLogger(__name__)


def _server_tools(cfg: ServeConfig):
    """The server-level ToolRunner: --tool specs, or the tiny TIM's own tools for the default model."""
    from timjax.tools.runner import ToolLimits, ToolRunner

    limits = ToolLimits(
        timeout_s=cfg.tool_timeout_s, max_calls=cfg.max_tool_calls, max_result_tokens=cfg.max_tool_result_tokens
    )
    if cfg.tools:
        from timjax.tools.spec import parse_tool_spec

        return ToolRunner([parse_tool_spec(s) for s in cfg.tools], limits), limits
    if cfg.model is None and cfg.default_tools:
        from timjax.train.tools_adapter import tool_servers

        return ToolRunner(tool_servers(), limits), limits
    return None, limits


def build_state(cfg: ServeConfig, model=None) -> dict:
    """Everything the routes read from ``app.state`` (the model is loaded here unless given)."""
    import timjax
    from timjax.api import default_model_path
    from timjax.serve.backend import Backend
    from timjax.serve.tools import ToolSet

    if cfg.tim is None:
        cfg = cfg.model_copy(update={"tim": cfg.model is None})
    if model is None:
        model = timjax.load(cfg.model or default_model_path(), dtype=cfg.dtype)
    metrics = Metrics()
    backend = Backend(
        model,
        max_batch=cfg.max_batch,
        max_queue=cfg.max_queue,
        max_seq_len=cfg.max_seq_len,
        page_size=cfg.page_size,
        impl=cfg.impl,
        reposition=cfg.reposition,
        engine_options={"max_step_tokens": cfg.max_step_tokens, "prefix_cache": cfg.prefix_cache},
        on_finish=metrics.on_finish,
    )
    metrics.watch(backend.stats)
    runner, limits = _server_tools(cfg)
    return {
        "config": cfg,
        "backend": backend,
        "metrics": metrics,
        "tool_runner": runner,
        "tools": ToolSet(runner) if runner is not None else None,
        "tool_limits": limits,
        "runs": OrderedDict(),
    }


def create_app(cfg: ServeConfig, *, model=None) -> FastAPI:
    state = build_state(cfg, model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine, warmup = state["backend"].engine, state["config"].warmup
        if warmup == "eager":  # before uvicorn accepts: the first requests meet compiled steps
            await run_in_threadpool(engine.warmup, progress=True)
        elif warmup == "background":
            engine.warmup(background=True)
        state["backend"].start()
        try:
            yield
        finally:  # SIGTERM: uvicorn stopped accepting and waited for open requests; finish what is left
            await run_in_threadpool(state["backend"].stop, drain=True, timeout=state["config"].grace_s)
            if state["tool_runner"] is not None:
                state["tool_runner"].close()

    app = FastAPI(title="timjax", lifespan=lifespan, docs_url=None, redoc_url=None)
    for k, v in state.items():
        setattr(app.state, k, v)
    errors.install(app)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(runs.router)

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        size = request.headers.get("content-length")
        limit = state["config"].max_body_bytes
        if size is not None and size.isdigit() and int(size) > limit:
            response = error_response(request, 413, f"the body has {size} bytes; this server takes at most {limit}")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "other"
        state["metrics"].requests.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state["config"].model_id(), **state["backend"].stats()}

    @app.get("/metrics")
    async def metrics():
        body = state["metrics"].render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
