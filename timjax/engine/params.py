"""Per-request parameters of the open engine: one pydantic model, validated once at the door.

``RequestParams`` holds everything one request asks for (sampling, stops, the TIM schema and pruning, the
position mode, tools and their limits, a deadline). ``Engine.add_request(prompt, params)`` takes it, or a
plain dict of the same fields; ``RequestParams.coerce`` turns either into a checked model and turns a bad
field into a one-line :class:`timjax.base.errors.ParameterError` naming it (``invalid top_p=2.0: ...``), the
same wording as ``timjax.generate``'s checks (``timjax.base.validation``). Checks that need the model (stop ids
below the vocabulary, a tokenizer for text prompts, stop strings or schemas) run in ``add_request``.

Fields
------
``max_new_tokens`` (>= 1), ``temperature`` (>= 0), ``top_p`` (in (0, 1]), ``top_k`` (>= 0; 0 = off),
``seed`` (uint32): sampling; greedy when ``temperature == 0``.
``stop`` (strings; need a tokenizer), ``stop_ids`` (token ids; None = the model's EOS ids).
``chat`` / ``system``: a text prompt goes through the chat template (with a TIM schema it always does,
with the TIM system prompt unless ``system`` is given).
``schema``: None (plain generation), a ``timjax.tim.schema.TimSchema``, or a dict of ``tim_schema``
keyword options (``{"max_depth": 4}``): turns on TIM structured reasoning.
``pruning_buffer``: None = no pruning; 0, 1, 2, ...: the FIFO prune buffer (TIM only).
``reposition``: "reencode" / "shift" for pruned sub-trees; None = the engine's setting.
``tools``: MCP tool servers as ``timjax.generate(tools=...)`` takes them (``ToolServer``, ``MCPServer``,
``StdioServerParameters``, URLs) or a started ``ToolRunner`` (shared, not closed by the engine); turns on
TIM. The engine connects to them off its loop thread and closes them when the request ends.
``tool_limits``: a ``timjax.tools.runner.ToolLimits`` or a dict of its fields.
``timeout_s``: the request's deadline, from ``add_request``; past it the request ends with
``finish_reason="timeout"`` (pages freed, no tool call left running).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from timjax.base.errors import ParameterError
from timjax.base.validation import U32_MAX, fail, stop_strings


class RequestParams(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    max_new_tokens: int = Field(256, ge=1, le=2**31 - 1)
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31 - 1)
    seed: int = Field(0, ge=0, le=U32_MAX)
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None
    chat: bool = False
    system: str | None = None
    schema_: Any = Field(None, alias="schema")
    pruning_buffer: int | None = Field(None, ge=0)
    reposition: Literal["reencode", "shift"] | None = None
    tools: Any = None
    tool_limits: Any = None
    timeout_s: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @property
    def schema(self) -> Any:  # noqa: D401 - the TIM schema (pydantic reserves the name ``schema``)
        return self.schema_

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        stop_strings("stop", list(v) if isinstance(v, tuple) else v)
        return tuple(v)

    @field_validator("stop_ids", mode="before")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and (isinstance(v, (str, bytes)) or not hasattr(v, "__iter__")):
            raise fail("stop_ids", v, "expected a list of token ids or None")
        return v

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v):
        if v is None or isinstance(v, dict) or callable(getattr(v, "json_schema", None)):
            return v
        raise ValueError("expected a timjax.tim.schema.TimSchema, a dict of tim_schema options, or None")

    @field_validator("tool_limits")
    @classmethod
    def _tool_limits(cls, v):
        if v is None or isinstance(v, dict) or hasattr(v, "max_calls"):
            return v
        raise ValueError("expected a timjax.tools.runner.ToolLimits, a dict of its fields, or None")

    @property
    def tim(self) -> bool:
        """Whether the request runs under the TIM controller (a schema or tools)."""
        return self.schema_ is not None or self.tools is not None

    @classmethod
    def coerce(cls, params: RequestParams | dict | None = None, **overrides: Any) -> RequestParams:
        """``params`` (a model, a dict of fields, or None for the defaults) with ``overrides``, checked; a bad
        field raises ``ParameterError`` naming it."""
        if isinstance(params, RequestParams) and not overrides:
            return params
        if isinstance(params, RequestParams):
            data = {**params.model_dump(by_alias=True), **overrides}
        elif params is None or isinstance(params, dict):
            data = {**(params or {}), **overrides}
        else:
            raise fail("params", params, "expected a timjax.engine.RequestParams, a dict of its fields, or None")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            name = ".".join(str(p) for p in err["loc"]) or "params"
            name = "schema" if name == "schema_" else name
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, ParameterError):
                raise cause from None
            msg = err["msg"].removeprefix("Value error, ")
            raise fail(name, err.get("input"), msg) from None
