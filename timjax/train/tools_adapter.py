"""The corpus's view of the tools: their specs, a call's parameters, the real result and its encoding.

``ToolBackend`` calls the pure Python functions of the package's MCP servers
(``timjax.tools.servers.calculator.calculate``, ``timjax.tools.servers.kb.lookup`` over
``generate_kb(kb_seed)``) and encodes their results with ``timjax.tools.encoding.encode_result``, so a
training document holds exactly what the runtime writes after ``"tool_result"``. The tool specs (names,
descriptions, input schemas, in the order the runtime offers them) are listed from the servers themselves
through ``timjax.tools.runner.ToolRunner``, as ``timjax.generate(tools=...)`` does.
"""

from __future__ import annotations

import random
from fractions import Fraction
from functools import lru_cache
from typing import Any

from timjax.tim.schema import ToolSpec

OP_NAMES = {"+": "add", "-": "sub", "*": "mul", "/": "div"}

# relation -> (phrase in questions, kind of entity it leads to or None for a value)
RELATIONS: dict[str, tuple[str, str | None]] = {
    "born_in": ("birthplace", "city"),
    "lives_in": ("home city", "city"),
    "age": ("age", None),
    "occupation": ("occupation", None),
    "friend": ("friend", "person"),
    "employer": ("employer", "company"),
    "country": ("country", "country"),
    "population": ("population", None),
    "capital": ("capital", "city"),
    "continent": ("continent", None),
    "area": ("area", None),
    "based_in": ("base city", "city"),
    "founded": ("founding year", None),
}


def tool_servers(kb_seed: int = 0) -> list:
    """The MCP servers the tiny TIM is trained with (in-process ``MCPServer`` objects)."""
    from timjax.tools.servers import calculator, kb

    return [calculator.make_server(), kb.make_server(seed=kb_seed)]


@lru_cache(maxsize=4)
def listed_specs(kb_seed: int = 0) -> tuple[ToolSpec, ...]:
    """The tool specs as the runtime lists them from the servers."""
    from timjax.tools.runner import ToolRunner

    with ToolRunner(tool_servers(kb_seed)) as runner:
        specs = runner.specs
        return tuple(specs() if callable(specs) else specs)


class ToolBackend:
    """Tool calls for the corpus: the servers' pure functions and the runtime's result encoding."""

    def __init__(self, kb_seed: int = 0):
        from timjax.tools.servers.kb import generate_kb

        self.kb_seed = kb_seed
        self.kb = generate_kb(kb_seed)

    def specs(self) -> list[ToolSpec]:
        return list(listed_specs(self.kb_seed))

    def encode(self, result: Any) -> str:
        from timjax.tools.encoding import encode_result

        return encode_result(result)

    # ---- calls: (tooluse dict with the encoded result, the result value)
    def calculate(self, a: int, op: str, b: int) -> tuple[dict, Fraction]:
        from timjax.tools.servers.calculator import calculate

        params = {"op": OP_NAMES[op], "a": a, "b": b}
        out = calculate(**params)
        return self._tooluse("calculator", params, out), Fraction(out["result"])

    def lookup(self, entity: str, relation: str) -> tuple[dict, str]:
        from timjax.tools.servers.kb import lookup

        params = {"entity": entity, "relation": relation}
        out = lookup(self.kb, **params)
        return self._tooluse("lookup", params, out), str(out["result"])

    def _tooluse(self, name: str, params: dict, result: Any) -> dict:
        return {"tool_name": name, "parameters": params, "tool_result": Raw(self.encode(result))}

    # ---- knowledge-base questions
    def random_chain(self, rng: random.Random, hops: int) -> tuple[str, tuple[str, ...], str]:
        """A start entity and ``hops`` relations, each hop but the last leading to another entity."""
        kinds = self.kb.kinds
        for _ in range(1000):
            start = rng.choice(self.kb.entities("person") if rng.random() < 0.7 else self.kb.entities())
            entity, rels = start, []
            for h in range(hops):
                options = [r for r in self.kb.facts[entity] if h == hops - 1 or RELATIONS[r][1] is not None]
                if not options:
                    break
                r = rng.choice(options)
                rels.append(r)
                entity = self.kb.facts[entity][r]
                if h < hops - 1 and entity not in kinds:
                    break
            if len(rels) == hops:
                return start, tuple(rels), str(entity)
        raise RuntimeError(f"no {hops}-hop chain in the knowledge base")

    def relation_phrase(self, relation: str) -> str:
        return RELATIONS[relation][0]

    def question_word(self, relation: str) -> str:
        return "Who" if RELATIONS[relation][1] == "person" else "What"


class Raw(str):
    """A JSON value already encoded (a tool result as the runtime writes it): emitted verbatim."""


def training_schema(tools: ToolBackend):
    """The TIM schema the model is trained on: the backend's tools offered."""
    from timjax.tim.schema import tim_schema

    return tim_schema(tools=tools.specs())


@lru_cache(maxsize=4)
def default_backend(kb_seed: int = 0) -> ToolBackend:
    return ToolBackend(kb_seed)
