"""``timjax serve``: the runtime as an HTTP service (OpenAI chat completions, Anthropic messages, the Runs
API with per-request MCP tools; SSE streams; /health, /metrics).

Modules: ``app`` (the factory), ``openai`` / ``anthropic`` / ``runs`` (routes and their wire types),
``generation`` (request -> engine request, result -> answer and tree), ``backend`` (the only module that
talks to the engine), ``tools`` (per-request tools and the URL policy), ``sse``, ``auth``, ``errors``,
``metrics``, ``config``, ``command`` (the CLI subcommand).
"""
