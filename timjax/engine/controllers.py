"""From ``RequestParams`` to an engine ``Request``: prompt encoding, default stop ids, and the controller
(``PlainController``, or the ``TimController`` when the request has a schema or tools).

This is where the engine meets the TIM and tools layers: the loop below it (``loop``, ``scheduler``,
``runner``) knows only the controller protocol. Opening tool servers (``open_tools``) may take seconds:
``Engine.add_request`` runs it on a worker thread, never on the loop thread.
"""

from __future__ import annotations

from typing import Any

from timjax.base.validation import Int, fail
from timjax.engine.params import RequestParams
from timjax.engine.protocol import PlainController, Request


def encode_prompt(model: Any, prompt: str | list[int], *, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids for a prompt: ids as given, text through the tokenizer (and the chat template if ``chat``)."""
    if isinstance(prompt, str):
        tok = model.tokenizer
        if tok is None:
            raise ValueError(
                "a text prompt needs a tokenizer: load a checkpoint with tokenizer files, or pass token ids"
            )
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(prompt, add_special_tokens=False)["input_ids"])
    return [int(t) for t in prompt]


def default_stop_ids(model: Any) -> list[int]:
    """The config's EOS ids, and the tokenizer's if it names another."""
    stop_ids = list(model.config.eos_token_ids)
    tok = model.tokenizer
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in stop_ids:
        stop_ids.append(tok.eos_token_id)
    return stop_ids


def check_for_model(model: Any, params: RequestParams) -> None:
    """The checks that need the model: stop ids in the vocabulary, a tokenizer where one is needed."""
    vocab = model.config.vocab_size
    for i, t in enumerate(params.stop_ids or ()):
        Int(0, vocab - 1)(f"stop_ids[{i}]", t)
    if model.tokenizer is None:
        if params.stop:
            raise fail("stop", list(params.stop), "stop strings need a tokenizer; pass stop_ids instead")
        if params.tim:
            raise fail(
                "schema",
                params.schema,
                "TIM generation needs the model's tokenizer (load a checkpoint with tokenizer files)",
            )


def tim_schema_of(params: RequestParams, tool_specs: Any = None):
    from timjax.tim.schema import TimSchema, tim_schema, with_tools

    schema = params.schema
    if isinstance(schema, dict):
        schema = tim_schema(**schema)
    if tool_specs is not None:
        schema = with_tools(schema if isinstance(schema, TimSchema) or schema is None else schema, tool_specs)
    return schema if schema is not None else tim_schema()


def tim_prompt(model: Any, prompt: str | list[int], params: RequestParams, schema: Any) -> list[int]:
    """A text prompt for TIM goes through the chat template with the format-stating system prompt."""
    system, chat = params.system, params.chat
    if system is None:
        from timjax.tim.prompt import tim_system_prompt

        system = tim_system_prompt(schema)
        chat = chat or getattr(model.tokenizer, "chat_template", None) is not None
    return encode_prompt(model, prompt, chat=chat, system=system)


def open_tools(params: RequestParams):
    """``(runner, close)`` for the request's tools: a started ``ToolRunner`` is shared (close is None)."""
    from timjax.tools.runner import ToolLimits, open_runner

    limits = params.tool_limits
    if isinstance(limits, dict):
        limits = ToolLimits(**limits)
    runner, owned = open_runner(params.tools, limits)
    return runner, (runner.close if owned else None)


def build_request(model: Any, prompt: str | list[int], params: RequestParams, *, tools_runner: Any = None) -> Request:
    """The engine request for ``prompt`` under ``params`` (with the tools already opened, if any)."""
    stop_ids = list(params.stop_ids) if params.stop_ids is not None else default_stop_ids(model)
    if tools_runner is None and hasattr(params.tools, "session"):  # a started ToolRunner, shared
        tools_runner = params.tools
    if params.tim:
        from timjax.engine.tim_controller import TimController

        schema = tim_schema_of(params, tools_runner.specs if tools_runner is not None else None)
        ids = tim_prompt(model, prompt, params, schema)
        ctrl: Any = TimController(
            model,
            schema,
            max_new_tokens=params.max_new_tokens,
            prompt_len=len(ids),
            pruning_buffer=params.pruning_buffer,
            stop_ids=stop_ids,
            tools=tools_runner,
        )
    else:
        ids = encode_prompt(model, prompt, chat=params.chat, system=params.system)
        ctrl = PlainController(
            max_new_tokens=params.max_new_tokens, stop_ids=stop_ids, stop=params.stop, tokenizer=model.tokenizer
        )
    return Request(
        ids,
        params.max_new_tokens,
        params.temperature,
        params.top_k,
        params.top_p,
        params.seed,
        ctrl,
        reposition=params.reposition,
    )
