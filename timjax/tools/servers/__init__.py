"""MCP servers shipped with timjax (tests, demos, training data): ``calculator`` (exact arithmetic, one
binary operation per call) and ``kb`` (``lookup`` over a small generated knowledge base).

Each module has pure functions (the training-data generator calls them directly) and
``make_server(...) -> MCPServer``; ``python -m timjax.tools.servers.<module>`` serves it over stdio.
"""

SERVERS = ("calculator", "kb")
