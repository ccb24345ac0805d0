"""Plain-text rendering of a TIM reasoning tree, with pruned subtask lists marked."""

from __future__ import annotations

import json
import textwrap
from typing import Any, Iterable


def _short(text: Any, width: int) -> str:
    s = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    return textwrap.shorten(s, width=width, placeholder=" ...") if width else s


def format_tree(response: Any, pruned_paths: Iterable[tuple[int, ...]] = (), *, width: int = 100) -> str:
    """``response``: a parsed ``Response`` or a plain dict (e.g. a partial tree)."""
    data = response.model_dump(mode="json", exclude_none=True) if hasattr(response, "model_dump") else response
    pruned = {tuple(p) for p in pruned_paths}
    lines: list[str] = []

    def task(t: dict, path: tuple[int, ...], depth: int):
        pad = "  " * depth
        label = ".".join(map(str, path))
        title = f" {t['title']}" if t.get("title") else ""
        lines.append(f"{pad}[{label}]{title}")
        if "thought" in t:
            lines.append(f"{pad}  thought: {_short(t['thought'], width)}")
        if t.get("tooluse"):
            tu = t["tooluse"]
            lines.append(
                f"{pad}  tool: {tu.get('tool_name')}({_short(tu.get('parameters'), width // 2)})"
                f" -> {_short(tu.get('tool_result'), width // 2)}"
            )
        subs = t.get("subtasks")
        if subs:
            mark = "  [pruned from working memory]" if path in pruned else ""
            lines.append(f"{pad}  subtasks ({len(subs)}){mark}:")
            for i, s in enumerate(subs):
                task(s, path + (i,), depth + 2)
        if "conclusion" in t:
            lines.append(f"{pad}  conclusion: {_short(t['conclusion'], width)}")

    for i, t in enumerate((data or {}).get("reasoning") or []):
        task(t, (i,), 0)
    if data and "answer" in data:
        lines.append(f"answer: {_short(data['answer'], width)}")
    return "\n".join(lines)
