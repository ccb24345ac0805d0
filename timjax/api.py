"""The public API: ``load``, ``logits`` (in model.py), ``generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from timjax.engine.controllers import default_stop_ids, encode_prompt
from timjax.qwen3.model import Qwen3

Prompt = str | list[int]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# The shipped tiny TIM (trained by `timjax train timjax/train/configs/tiny_tim.json`): the default model.
DEFAULT_MODEL_DIR = Path(__file__).parent / "tiny_tim"


def default_model_path() -> Path:
    """The shipped tiny TIM checkpoint directory (Hugging Face format)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        from timjax.base.errors import TimjaxError

        raise TimjaxError(f"{DEFAULT_MODEL_DIR}: the default model is missing from this install")
    return DEFAULT_MODEL_DIR


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (transformers, local files only), or None when the directory has none."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load(path: str | Path, dtype=None, *, tokenizer: bool = True, mesh=None) -> Qwen3:
    """Load a converted timjax checkpoint directory, or a Hugging Face checkpoint directory directly.
    ``dtype`` (bfloat16/float16/float32) defaults to the dtype the checkpoint stores its weights in, so a
    float32 checkpoint gives transformers' float32 tokens. ``mesh`` (``timjax.runtime.sharding.make_mesh(tp, dp)``)
    loads straight into the sharded layout."""
    from timjax.base.validation import check_load

    check_load(path, dtype, tokenizer)
    if mesh is not None:
        from timjax.runtime import sharding

        return sharding.load(path, dtype, mesh=mesh, tokenizer=load_tokenizer(path) if tokenizer else None)
    from timjax.convert import read_params

    cfg, params = read_params(path, dtype=dtype)  # dtype None: as stored
    return Qwen3(cfg, dtype=params["embed"].dtype, params=params, tokenizer=load_tokenizer(path) if tokenizer else None)


def _is_batch(prompt) -> bool:
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and not isinstance(prompt[0], (int,))
        and not hasattr(prompt[0], "__index__")
    )


def generate(
    model: Qwen3 | Any,
    prompt: Prompt | Sequence[Prompt],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    max_batch: int = 8,
    page_size: int = 16,
    max_seq_len: int | None = None,
    kv_tokens: int | None = None,
    kv_memory_fraction: float | None = None,
    impl: str = "auto",
    chat: bool = False,
    system: str | None = None,
    on_token: Callable[[int, int], None] | None = None,
    progress: bool = False,
    schema: Any = None,
    pruning_buffer: int | None = None,
    reposition: str = "reencode",
    engine_options: dict | None = None,
    tools: Any = None,
    tool_limits: Any = None,
    mesh=None,
    _runner: Any = None,
):
    """Generate from one prompt (a string or token ids) or a batch of them.

    Returns a ``GenerationResult`` for one prompt, a list of them for a batch. ``schema`` (a
    ``timjax.tim.TimSchema``) turns on TIM structured reasoning with subtask pruning
    (``pruning_buffer``: None = off, 0, 1, 2, ...; ``reposition``: "reencode" or "shift").
    With a schema, text prompts are wrapped in the chat template with a system prompt that states the
    format and the tools (``timjax.tim.prompt.tim_system_prompt``) unless ``system`` is given.
    ``on_token(prompt_index, token_id)`` streams tokens as they are sampled.
    ``tools``: MCP servers the model may call inside the inference (``timjax.tools.runner.ToolServer``,
    ``MCPServer``, ``StdioServerParameters``, URLs, or a started ``ToolRunner``); turns on TIM (the schema
    offers their tools) with ``tool_limits`` (``timjax.tools.runner.ToolLimits``: timeout, call cap, result cap).
    ``model`` may be a ``timjax.Engine``: it serves the call with its cache and compiled steps (no
    recompilation across calls); the cache options (max_batch ... engine_options) are then the engine's.
    ``mesh`` (``timjax.runtime.sharding.make_mesh(tp, dp)``) shards the model over it; dp > 1 splits the prompts
    over dp engine replicas (``timjax.runtime.sharding.generate_data_parallel``).
    """
    args = dict(locals())  # first: the call's own arguments, forwarded to each dp replica
    from timjax.base.validation import check_generate

    check_generate(args)  # every argument, before any device work (issue 10)
    from timjax.engine import Engine

    engine = model if isinstance(model, Engine) else None
    model = engine.model if engine is not None else model
    batch = _is_batch(prompt)
    prompts = list(prompt) if batch else [prompt]
    if tools is not None:  # start the MCP clients once for the batch, offer their tools in the schema, close
        from timjax.tim.schema import with_tools
        from timjax.tools.runner import open_runner

        runner, close_runner = open_runner(tools, tool_limits)
        try:
            return generate(**{**args, "schema": with_tools(schema, runner.specs), "tools": None, "_runner": runner})
        finally:
            if close_runner:
                runner.close()
    if engine is None and (mesh is not None or getattr(model, "mesh", None) is not None):
        from timjax.runtime import sharding

        model = sharding.on_mesh(model, mesh)
        if model.mesh.shape[sharding.DP] > 1:
            kw = {k: v for k, v in args.items() if k not in ("model", "prompt", "mesh", "seed", "on_token")}
            rs = sharding.generate_data_parallel(generate, model, prompts, seed=seed, on_token=on_token, **kw)
            return rs if batch else rs[0]
    requests = _requests(model, prompts, args)
    if engine is None:
        ids = [r.prompt for r in requests]
        if max_seq_len is None and schema is None:
            max_seq_len = min(model.config.max_position_embeddings, max(map(len, ids)) + max_new_tokens)
        engine = Engine(
            model,
            max_batch=min(max_batch, len(requests)),
            page_size=page_size,
            max_seq_len=max_seq_len,
            kv_tokens=kv_tokens,
            kv_memory_fraction=kv_memory_fraction,
            impl=impl,
            reposition=reposition,
            **(engine_options or {}),
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="generate", unit="seq")
    try:
        results = engine.run(requests, on_token=on_token, progress=bar, reposition=reposition)
    finally:
        if bar is not None:
            bar.close()
    return results if batch else results[0]


def _requests(model: Qwen3, prompts: list, args: dict) -> list:
    """One engine request per prompt (prompt i samples with seed + i), under one ``RequestParams``."""
    from timjax.engine import RequestParams
    from timjax.engine.controllers import build_request

    schema, system, chat = args["schema"], args["system"], args["chat"]
    tim = schema is not None or args["_runner"] is not None
    if tim and system is None:
        from timjax.tim.prompt import tim_system_prompt
        from timjax.tim.schema import tim_schema

        system = tim_system_prompt(schema if schema is not None else tim_schema())
        # a text prompt for TIM goes through the chat template with the format-stating system prompt
        chat = chat or (model.tokenizer is not None and getattr(model.tokenizer, "chat_template", None) is not None)
    stop_ids = args["stop_ids"]
    params = RequestParams.coerce(
        {k: args[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "pruning_buffer")},
        stop_ids=list(stop_ids) if stop_ids is not None else default_stop_ids(model),
        schema=schema,
        tools=args["_runner"],
        reposition=args["reposition"],
    )
    out = []
    for i, p in enumerate(prompts):
        ids = encode_prompt(model, p, chat=chat, system=system)  # this module's name: tests may patch it
        out.append(build_request(model, ids, params.model_copy(update={"seed": args["seed"] + i})))
    return out
