"""Tools inside the inference, over MCP (no engine imports here).

* ``encoding``: ``encode_result`` / ``encode_error``: the exact text written after ``"tool_result": ``.
* ``servers``: the shipped MCP servers (``calculator``, ``kb`` with ``lookup``), pure functions + ``make_server``.
* ``runner``: ``ToolRunner``: MCP clients on a background event loop, argument validation, limits, faults.
"""
