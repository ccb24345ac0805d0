"""The public API: ``load``, ``logits`` (in model.py), ``generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from timjax.model import Qwen3

Prompt = str | list[int]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# The shipped tiny TIM (trained by `timjax train timjax/train/configs/tiny_tim.json`): the default model.
DEFAULT_MODEL_DIR = Path(__file__).parent / "tiny_tim"


def default_model_path() -> Path:
    """The shipped tiny TIM checkpoint directory (Hugging Face format)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        from timjax.errors import TimjaxError

        raise TimjaxError(f"{DEFAULT_MODEL_DIR}: the default model is missing from this install")
    return DEFAULT_MODEL_DIR


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (transformers, local files only), or None when the directory has none."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load(path: str | Path, dtype="bfloat16", *, tokenizer: bool = True, mesh=None) -> Qwen3:
    """Load a converted timjax checkpoint directory, or a Hugging Face checkpoint directory directly.
    ``mesh`` (``timjax.sharding.make_mesh(tp, dp)``) loads straight into the sharded layout."""
    from timjax.validation import check_load

    check_load(path, dtype, tokenizer)
    if mesh is not None:
        from timjax import sharding

        return sharding.load(path, dtype, mesh=mesh, tokenizer=load_tokenizer(path) if tokenizer else None)
    from timjax.convert import read_params

    cfg, params = read_params(path, dtype=dtype)
    return Qwen3(cfg, dtype=dtype, params=params, tokenizer=load_tokenizer(path) if tokenizer else None)


def encode_prompt(model: Qwen3, prompt: Prompt, *, chat: bool = False, system: str | None = None) -> list[int]:
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
    ids = [int(t) for t in prompt]
    return ids


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
    ``mesh`` (``timjax.sharding.make_mesh(tp, dp)``) shards the model over it; dp > 1 splits the prompts
    over dp engine replicas (``timjax.sharding.generate_data_parallel``).
    """
    args = dict(locals())  # first: the call's own arguments, forwarded to each dp replica
    from timjax.validation import check_generate

    check_generate(args)  # every argument, before any device work (issue 10)
    from timjax.engine import Engine, PlainController, Request

    engine = model if isinstance(model, Engine) else None
    model = engine.model if engine is not None else model

    batch = _is_batch(prompt)
    prompts = list(prompt) if batch else [prompt]
    if tools is not None:  # start the MCP clients once, offer their tools in the schema, run, close
        from timjax.tim.schema import with_tools
        from timjax.tools.runner import open_runner

        runner, close_runner = open_runner(tools, tool_limits)
        try:
            return generate(**{**args, "schema": with_tools(schema, runner.specs), "tools": None, "_runner": runner})
        finally:
            if close_runner:
                runner.close()
    if engine is None and (mesh is not None or getattr(model, "mesh", None) is not None):
        from timjax import sharding

        model = sharding.on_mesh(model, mesh)
        if model.mesh.shape[sharding.DP] > 1:
            kw = {k: v for k, v in args.items() if k not in ("model", "prompt", "mesh", "seed", "on_token")}
            rs = sharding.generate_data_parallel(generate, model, prompts, seed=seed, on_token=on_token, **kw)
            return rs if batch else rs[0]
    if schema is not None and system is None:
        from timjax.tim.prompt import tim_system_prompt

        system = tim_system_prompt(schema)
        # a text prompt for TIM goes through the chat template with the format-stating system prompt
        chat = chat or (model.tokenizer is not None and getattr(model.tokenizer, "chat_template", None) is not None)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    ids = [encode_prompt(model, p, chat=chat, system=system) for p in prompts]
    if stop_ids is None:
        stop_ids = list(model.config.eos_token_ids)
        tok = model.tokenizer
        if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in stop_ids:
            stop_ids.append(tok.eos_token_id)

    requests = []
    for i, p in enumerate(ids):
        if schema is not None:
            from timjax.tim_controller import TimController

            ctrl = TimController(
                model,
                schema,
                max_new_tokens=max_new_tokens,
                prompt_len=len(p),
                pruning_buffer=pruning_buffer,
                stop_ids=stop_ids,
                tools=_runner,
            )
        else:
            ctrl = PlainController(
                max_new_tokens=max_new_tokens, stop_ids=stop_ids, stop=stop, tokenizer=model.tokenizer
            )
        requests.append(Request(p, max_new_tokens, temperature, top_k, top_p, seed + i, ctrl))

    if engine is None:
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
