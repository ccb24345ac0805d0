"""Incremental reasoning-tree tracker: tokens in, tree events out (no JAX, no tokenizer needed).

``TreeTracker.feed(token_id, token_bytes)`` consumes one generated (or forced) token of a TIM JSON
document (layout: ``schema.py``) and returns events:

* ``ListOpened(list_id, task_path, token_index)``: a ``subtasks`` list's ``[`` was read.
* ``ListCompleted(list_id, task_path, token_span=(i, j))``: its ``]`` was read; ``[i, j)`` are the
  tokens strictly between the ``[`` token and the ``]`` token, i.e. exactly the list's elements.
* ``ToolCallReady(task_path, tool_name, parameters_json)``: the ``"tool_result"`` key is complete;
  the runtime now writes ``": " + <encoded result>`` (``timjax.tools.encoding``). The key's closing
  quote always ends its token (a straddling token is ``Split`` there, like a list bracket), so nothing
  of the value has been written when the event fires.
* ``DocumentComplete(token_index)``: the top-level object is closed.
* ``Split(token_index, token_id, pieces, token_ids)``: the token was NOT consumed, see below.

Task paths: ``(0, 2, 1)`` is ``reasoning[0].subtasks[2].subtasks[1]``; ``()`` is the top-level
object (fields ``reasoning`` / ``answer``).

Token attribution (``location(i) -> TokenLoc(task_path, field)``): a *member* of an object is the
bytes from its key's opening quote to its value's last byte. Each byte belongs to the innermost task
object containing it (braces included; the top-level object is task ``()``) and, within it, to the
member containing it, if any (bytes nested deeper, e.g. inside ``tooluse`` or between the elements
of a ``subtasks`` list, belong to that member). A token is attributed to the member of its first byte
that lies in a member; a token made only of inter-member bytes (``{``, ``}``, separators) gets
``field=None`` and the task of its first byte. A token that starts a key is attributed once the key
is complete (``location`` is ``None`` until then).

THE TOKEN BOUNDARY RULE (what gets pruned, exactly)
---------------------------------------------------
Pruning a ``subtasks`` list removes the list's elements and nothing else: the parent's thought, tool
use and conclusion stay, and the working memory keeps a valid JSON skeleton ``"subtasks": []``. To
make that a whole-token operation, every subtask list's ``[`` is the LAST byte of its token and its
``]`` is the FIRST byte of its token, by construction: when an incoming token straddles such a
bracket (Qwen3 has e.g. ``' [{"'``, ``'"}]'``, ``'}],'``, ``'"}]}'``), ``feed`` consumes nothing and
returns ``[Split(pieces=...)]``: the token's bytes cut right after each list ``[`` and right before each
list ``]``. The engine replaces the sampled token by the tokenization of each piece (``token_ids`` if
the tracker was given an ``encode`` callable, e.g. ``LLTokenizer.tokenize_bytes``), rolls the grammar
back by one token if it had consumed it, and consumes/feeds the replacement tokens one by one (they
never straddle: pieces contain no bracket boundary). llguidance constrains bytes, so it accepts any
tokenization of the same bytes (tested). Then the pruned span is exactly the tokens strictly between
the ``[`` token and the ``]`` token, and what stays, ``... ": [`` + ``]}, ...``, is the valid skeleton.

Why this rule keeps both cache modes exact: the model only ever attended to the tokens that are
in the cache, and after a prune the cache holds exactly the kept tokens in order. ``reencode``
recomputes the suffix after the span from those same token ids at compacted positions; ``shift``
keeps the suffix K/V and rotates keys by ``-len(span)``; the two differ only in whether the suffix's
K/V saw the pruned tokens (a property of the pruning method, not of token boundaries). No token is
ever half-pruned and no re-tokenization of kept text is needed (the kept token ids are exactly what
``WorkingMemory.kept_tokens()`` returns, and decoding them gives valid JSON once the document is
complete). The price: sequences containing a split token are not the tokenizer's canonical
tokenization (1-3 extra tokens per list); the model trained on canonical text sees ``' [' + '{"'``
instead of ``' [{"'``. The alternative (pruning from inside a token) would need re-encoding of a
partial token and cannot be done in shift mode, so we accept this.

The tracker assumes its input is valid TIM JSON (the grammar guarantees it); it does not validate.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

__all__ = [
    "DocumentComplete",
    "Event",
    "ListCompleted",
    "ListInfo",
    "ListOpened",
    "Split",
    "TokenLoc",
    "ToolCallReady",
    "TreeTracker",
]

TaskPath = tuple[int, ...]


@dataclass(frozen=True)
class TokenLoc:
    task_path: TaskPath
    field: Optional[str]


@dataclass(frozen=True)
class ListOpened:
    list_id: int
    task_path: TaskPath
    token_index: int  # the token ending with '['


@dataclass(frozen=True)
class ListCompleted:
    list_id: int
    task_path: TaskPath  # the task owning the subtasks list
    token_span: tuple[int, int]  # [i, j): the list's elements, in history token indices
    byte_span: tuple[int, int]  # [a, b): bytes strictly between '[' and ']'

    def contains(self, other: "ListCompleted") -> bool:
        i, j = self.token_span
        return other.list_id != self.list_id and i <= other.token_span[0] and other.token_span[1] <= j


@dataclass(frozen=True)
class ToolCallReady:
    task_path: TaskPath
    tool_name: str
    parameters_json: str
    token_index: int


@dataclass(frozen=True)
class DocumentComplete:
    token_index: int


@dataclass(frozen=True)
class Split:
    token_index: int  # where the replacement tokens go (the split token was not consumed)
    token_id: int
    pieces: tuple[bytes, ...]
    token_ids: Optional[tuple[int, ...]] = None  # concatenated tokenizations of the pieces


Event = Union[ListOpened, ListCompleted, ToolCallReady, DocumentComplete, Split]


@dataclass
class ListInfo:
    list_id: int
    task_path: TaskPath
    open_token: int
    open_byte: int
    close_token: Optional[int] = None
    close_byte: Optional[int] = None


class _Frame:
    __slots__ = ("kind", "role", "path", "st", "key", "kbuf", "n", "list_id", "vstart", "spans", "pending")

    def __init__(self, kind: str, role: str, path: TaskPath):
        self.kind = kind  # 'obj' | 'arr'
        self.role = role  # 'root' | 'reasoning' | 'task' | 'subtasks' | 'tooluse' | 'other'
        self.path = path
        # obj: 'k?' expect key/'}', 'k' in key, ':' key done, 'v' value in progress, 'a' after value
        # arr: 'v?' expect value/']', 'v' value in progress, 'a' after value
        self.st = "k?" if kind == "obj" else "v?"
        self.key: Optional[str] = None
        self.kbuf = bytearray()
        self.n = 0  # arr: elements started
        self.list_id = -1
        self.vstart = -1  # byte offset of the current value
        self.spans: dict[str, tuple[int, int]] = {}  # tooluse: key -> value byte span
        self.pending: list[int] = []  # tokens waiting for the current key


_WS = frozenset(b" \t\r\n")
_SCALAR_END = frozenset(b",}] \t\r\n")
_TASKLIKE = ("task", "root")


class _Machine:
    """Byte-level JSON structure machine. ``step`` returns (location, actions)."""

    def __init__(self):
        self.stack: list[_Frame] = []
        self.in_str = False
        self.str_key = False
        self.esc = False
        self.in_scalar = False
        self.done = False

    def clone(self) -> "_Machine":
        m = _Machine.__new__(_Machine)
        m.__dict__.update(self.__dict__)
        m.stack = [copy.copy(f) for f in self.stack]
        for f in m.stack:
            f.kbuf = bytearray(f.kbuf)
        return m

    def _loc(self, c: int):
        """('sig', frame) | ('pend', frame) | ('none', frame or None) for byte c, before processing."""
        st = self.stack
        if c == 0x7B and not self.in_str and st and st[-1].role in ("reasoning", "subtasks"):
            return ("none", None)  # a task's '{' belongs to the new task, outside its members
        for k in range(len(st) - 1, -1, -1):
            f = st[k]
            if f.role in _TASKLIKE:
                if k != len(st) - 1:
                    return ("sig", f)
                if f.st == "k" or (f.st == "k?" and c == 0x22 and not self.in_str):
                    return ("pend", f)
                if f.st in (":", "v"):
                    return ("sig", f)
                return ("none", f)
        return ("none", None)

    def _value_end(self, actions: list, end: int) -> None:
        if self.stack:
            top = self.stack[-1]
            top.st = "a"
            actions.append(("vend", top, end))

    def step(self, c: int, pos: int, actions: list):
        """Process byte c at absolute offset pos; append actions; return the byte's location."""
        if self.in_scalar and c in _SCALAR_END:
            self.in_scalar = False
            self._value_end(actions, pos)
        loc = self._loc(c)
        if self.in_str:
            top = self.stack[-1]
            if self.esc:
                self.esc = False
                if self.str_key:
                    top.kbuf.append(c)
            elif c == 0x5C:  # backslash
                self.esc = True
                if self.str_key:
                    top.kbuf.append(c)
            elif c == 0x22:  # closing quote
                self.in_str = False
                if self.str_key:
                    top.key = json.loads(b'"' + bytes(top.kbuf) + b'"')
                    top.st = ":"
                    actions.append(("key", top, pos + 1))
                else:
                    self._value_end(actions, pos + 1)
            elif self.str_key:
                top.kbuf.append(c)
            return loc
        if self.in_scalar or c in _WS:
            return loc
        top = self.stack[-1] if self.stack else None
        if c == 0x2C:  # ,
            top.st = "k?" if top.kind == "obj" else "v?"
            return loc
        if c == 0x3A:  # :
            return loc
        if c in (0x7D, 0x5D):  # } ]
            f = self.stack.pop()
            actions.append(("close", f, pos))
            if not self.stack:
                self.done = True
            self._value_end(actions, pos + 1)
            return loc
        if top is not None and top.kind == "obj" and top.st == "k?":
            if c != 0x22:
                raise ValueError(f"unexpected byte {bytes([c])!r} where a key should start (offset {pos})")
            self.in_str, self.str_key, self.esc = True, True, False
            top.st = "k"
            top.kbuf = bytearray()
            return loc
        # a value starts
        if top is not None:
            top.st = "v"
            top.vstart = pos
            if top.kind == "arr":
                top.n += 1
            actions.append(("vstart", top, pos))
        if c == 0x7B or c == 0x5B:  # { [
            kind = "obj" if c == 0x7B else "arr"
            if top is None:
                role, path = ("root" if kind == "obj" else "other"), ()
            elif top.role == "root" and top.key == "reasoning" and kind == "arr":
                role, path = "reasoning", ()
            elif top.role in ("reasoning", "subtasks") and kind == "obj":
                role, path = "task", top.path + (top.n - 1,)
            elif top.role == "task" and top.key == "subtasks" and kind == "arr":
                role, path = "subtasks", top.path
            elif top.role == "task" and top.key == "tooluse" and kind == "obj":
                role, path = "tooluse", top.path
            else:
                role, path = "other", top.path
            f = _Frame(kind, role, path)
            self.stack.append(f)
            actions.append(("open", f, pos))
        elif c == 0x22:
            self.in_str, self.str_key, self.esc = True, False, False
        else:
            self.in_scalar = True
        return loc


class TreeTracker:
    """Per-sequence tracker (see the module docstring).

    Args:
        encode: optional ``bytes -> list[int]`` used to fill ``Split.token_ids``.
        enforce_boundaries: emit ``Split`` for tokens straddling a list bracket (default). With
            False, straddling tokens are consumed and list spans round inwards (for analysis only).
    """

    def __init__(self, encode: Optional[Callable[[bytes], Sequence[int]]] = None, *, enforce_boundaries: bool = True):
        self._m = _Machine()
        self._encode = encode
        self.enforce_boundaries = enforce_boundaries
        self.buf = bytearray()  # every byte fed
        self.token_starts: list[int] = []  # byte offset of each token
        self.token_ids: list[int] = []
        self.locs: list[Optional[TokenLoc]] = []
        self.lists: dict[int, ListInfo] = {}
        self.completed: list[ListCompleted] = []
        self.tool_calls: list[ToolCallReady] = []

    # ---------------------------------------------------------------- queries
    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def done(self) -> bool:
        return self._m.done

    def token_bytes(self, i: int) -> bytes:
        end = self.token_starts[i + 1] if i + 1 < len(self.token_starts) else len(self.buf)
        return bytes(self.buf[self.token_starts[i] : end])

    def location(self, i: int) -> Optional[TokenLoc]:
        return self.locs[i]

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- feeding
    def split_points(self, data: bytes) -> list[int]:
        """Offsets inside ``data`` (0 < k < len) where it must be cut, without consuming it."""
        in_tooluse = any(f.role == "tooluse" for f in self._m.stack)
        if len(data) < 2 or (b"[" not in data and b"]" not in data and not (in_tooluse and b'"' in data[:-1])):
            return []
        m = self._m.clone()
        cuts: set[int] = set()
        actions: list = []
        base = len(self.buf)
        for k, c in enumerate(data):
            actions.clear()
            m.step(c, base + k, actions)
            for a, f, _ in actions:
                if f.role == "subtasks":
                    if a == "open" and k + 1 < len(data):
                        cuts.add(k + 1)
                    elif a == "close" and k > 0:
                        cuts.add(k)
                elif a == "key" and f.role == "tooluse" and f.key == "tool_result" and k + 1 < len(data):
                    cuts.add(k + 1)  # the runtime writes everything after this key: it ends its token
        return sorted(cuts)

    def feed(self, token_id: int, token: Union[bytes, str]) -> list[Event]:
        data = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        ti = len(self.token_ids)
        if self.enforce_boundaries:
            cuts = self.split_points(data)
            if cuts:
                bounds = [0, *cuts, len(data)]
                pieces = tuple(data[a:b] for a, b in zip(bounds, bounds[1:]))
                ids = None
                if self._encode is not None:
                    ids = tuple(int(t) for p in pieces for t in self._encode(p))
                return [Split(ti, int(token_id), pieces, ids)]
        if self._m.done and data:
            raise ValueError(f"token {token_id} ({data!r}) fed after the document was complete")
        events: list[Event] = []
        base = len(self.buf)
        self.token_ids.append(int(token_id))
        self.token_starts.append(base)
        self.buf += data
        self.locs.append(None)
        decided = False
        first_none: Optional[_Frame] = None
        actions: list = []
        m = self._m
        k, n = 0, len(data)
        while k < n:
            actions.clear()
            kind, f = m.step(data[k], base + k, actions)
            if not decided:
                if k == 0 and kind == "none":
                    first_none = f
                decided = self._place(ti, kind, f)
            for a, fr, p in actions:
                self._on_action(a, fr, p, ti, events)
            k += 1
            if m.in_str and not m.str_key and not m.esc and k < n:
                # inside a string value every byte up to a quote or a backslash changes nothing and lies
                # where the one before lies: skip the run (most of a thought's bytes)
                j = min((i for i in (data.find(b'"', k), data.find(b"\\", k)) if i >= 0), default=n)
                if j > k and not decided:
                    decided = self._place(ti, *m._loc(data[k]))
                k = j
        if not decided:
            if first_none is None and data:
                # the first byte opened a task (or the document): use the innermost task now
                first_none = next((fr for fr in reversed(m.stack) if fr.role in _TASKLIKE), None)
            self.locs[ti] = TokenLoc(first_none.path if first_none is not None else (), None)
        return events

    def _place(self, ti: int, kind: str, f) -> bool:
        """Token ``ti``'s location from one of its bytes: True once decided ("sig": here; "pend": at the
        key its frame is writing, once that key is known)."""
        if kind == "sig":
            self.locs[ti] = TokenLoc(f.path, f.key)
            return True
        if kind == "pend":
            f.pending.append(ti)
            return True
        return False

    def _on_action(self, a: str, f: _Frame, p: int, ti: int, events: list) -> None:
        if a == "key":
            if f.pending:
                loc = TokenLoc(f.path, f.key)
                for t in f.pending:
                    self.locs[t] = loc
                f.pending = []
            if f.role == "tooluse" and f.key == "tool_result":
                name_span = f.spans.get("tool_name")
                par_span = f.spans.get("parameters")
                name = json.loads(bytes(self.buf[name_span[0] : name_span[1]])) if name_span else ""
                params = bytes(self.buf[par_span[0] : par_span[1]]).decode("utf-8") if par_span else "{}"
                ev = ToolCallReady(f.path, name, params, ti)
                self.tool_calls.append(ev)
                events.append(ev)
        elif a == "vend":
            if f.role == "tooluse" and f.key is not None:
                f.spans[f.key] = (f.vstart, p)
        elif a == "open":
            if f.role == "subtasks":
                lid = len(self.lists)
                f.list_id = lid
                self.lists[lid] = ListInfo(lid, f.path, ti, p)
                events.append(ListOpened(lid, f.path, ti))
        elif a == "close":
            if f.role == "subtasks":
                info = self.lists[f.list_id]
                info.close_token, info.close_byte = ti, p
                ev = ListCompleted(info.list_id, info.task_path, (info.open_token + 1, ti), (info.open_byte + 1, p))
                self.completed.append(ev)
                events.append(ev)
            elif f.role == "root":
                events.append(DocumentComplete(ti))

    def feed_many(self, tokens: Sequence[tuple[int, Union[bytes, str]]]) -> list[Event]:
        """Feed several tokens; stops and returns at the first ``Split`` (it is the last event)."""
        out: list[Event] = []
        for tid, tb in tokens:
            ev = self.feed(tid, tb)
            out.extend(ev)
            if ev and isinstance(ev[0], Split):
                break
        return out
