"""``ServeConfig``: everything ``timjax serve`` is started with (one pydantic model, validated once)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # a checkpoint directory; None = the shipped tiny TIM
    served_model_name: str | None = None  # the id clients send as `model` / `engine`; default from MODEL
    tim: bool | None = None  # TIM requests (reasoning tree, pruning, tools); None = on for the shipped tiny TIM
    dtype: str = "float32"
    api_key: str | None = None  # bearer (or x-api-key) every /v1 route requires; None = open
    max_queue: int = Field(64, ge=1)  # waiting requests beyond the running batch; more get 429
    max_body_bytes: int = Field(1 << 20, ge=1024)
    tools: list[str] = []  # server-level MCP servers (`timjax generate --tool` specs)
    default_tools: bool = True  # the tiny TIM's calculator + lookup when MODEL and tools are not given
    allow_tool_url: list[str] = []  # host globs per-request tool URLs must match (none = refused)
    tool_timeout_s: float = Field(10.0, gt=0)
    max_tool_calls: int = Field(32, ge=1)
    max_tool_result_tokens: int = Field(256, ge=1)
    max_batch: int = Field(8, ge=1)
    max_seq_len: int = Field(2048, ge=16)
    page_size: int = Field(16, ge=1)
    max_step_tokens: int = Field(512, ge=1)  # tokens one engine step computes (long prompts are chunked)
    # compile every step shape ahead of requests: "background" (the loop compiles while idle; the server
    # answers at once), "eager" (before accepting requests), "off" (each shape when first met)
    warmup: Literal["background", "eager", "off"] = "background"
    impl: str = "auto"
    reposition: str = "reencode"
    prefix_cache: bool = True  # share KV pages of common prompt prefixes (the system prompt, the tool list)
    pruning_buffer: int | None = 2
    max_tokens_default: int = Field(1024, ge=1)  # when a request gives no max_tokens
    grace_s: float = Field(30.0, ge=0)  # SIGTERM: running requests get this long to finish
    retry_after_s: int = 1

    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return "timjax-tiny-tim"
        from pathlib import Path

        return Path(self.model).resolve().name
