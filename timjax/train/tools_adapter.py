"""The corpus's view of the tools: their specs, a call's parameters, the real result and its encoding.

``ToolBackend`` calls the pure Python functions of the package's MCP servers (``timjax.tools.servers``)
and encodes their results with ``timjax.tools.encoding.encode_result``, so that training documents hold
exactly what the runtime writes after ``"tool_result"``.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from functools import lru_cache
from typing import Any

from timjax.tim.schema import ToolSpec


class ToolBackend:
    """Tool calls for the corpus (PROVISIONAL until the tools package lands: same interface)."""

    def __init__(self, kb_seed: int = 0):
        self.kb = _provisional_kb(kb_seed)
        self.people = sorted(self.kb)

    # ---- specs (what the schema and the system prompt list)
    def specs(self) -> list[ToolSpec]:
        return [
            ToolSpec(name="calculator", description="exact arithmetic on integers: + - * / and parentheses",
                     input_schema={"type": "object", "properties": {"expression": {"type": "string"}},
                                   "required": ["expression"], "additionalProperties": False}),
            ToolSpec(name="lookup", description="a fact about an entity in the knowledge base",
                     input_schema={"type": "object", "properties": {"entity": {"type": "string"},
                                                                    "relation": {"type": "string"}},
                                   "required": ["entity", "relation"], "additionalProperties": False}),
        ]

    def encode(self, result: Any) -> str:
        return json.dumps(str(result), ensure_ascii=False)

    # ---- calls: (tooluse dict with the encoded result, the result value)
    def calculate(self, expression: str) -> tuple[dict, Fraction]:
        from timjax.train.corpus import parse_expression, value

        v = value(parse_expression(expression))
        text = str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"
        return self._tooluse("calculator", {"expression": expression}, text), v

    def lookup(self, entity: str, relation: str) -> tuple[dict, str]:
        result = self.kb[entity][relation]
        return self._tooluse("lookup", {"entity": entity, "relation": relation}, result), result

    def _tooluse(self, name: str, params: dict, result: Any) -> dict:
        from timjax.train.corpus import Raw

        return {"tool_name": name, "parameters": params, "tool_result": Raw(self.encode(result))}

    # ---- knowledge-base questions
    PERSON_RELATIONS = ("mother", "father", "boss", "friend")
    ATTRIBUTE_RELATIONS = ("city",)

    def random_chain(self, rng: random.Random, hops: int) -> tuple[str, tuple[str, ...], str]:
        start = rng.choice(self.people)
        rels = [rng.choice(self.PERSON_RELATIONS) for _ in range(hops - 1)]
        rels.append(rng.choice(self.PERSON_RELATIONS + self.ATTRIBUTE_RELATIONS))
        entity = start
        for r in rels:
            entity = self.kb[entity][r]
        return start, tuple(rels), entity

    def relation_phrase(self, relation: str) -> str:
        return {"city": "home city"}.get(relation, relation)

    def question_word(self, relation: str) -> str:
        return "What" if relation in self.ATTRIBUTE_RELATIONS else "Who"


FIRST = ("Ada Alan Bea Carl Dora Emil Fay Gus Hana Ivo Jon Kai Lea Max Nia Otto Pia Rex Sia Tom Uma Vic Wes "
         "Yan Zoe").split()
LAST = "Stone Reed Park Moss Hale Frost Lane Vale Wood Price Shaw Kerr".split()
CITIES = "Paris Lima Oslo Kyoto Cairo Quito Rome Perth Dakar Hanoi".split()


@lru_cache(maxsize=4)
def _provisional_kb(seed: int) -> dict[str, dict[str, str]]:
    rng = random.Random(seed)
    people = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(people)
    people = people[:120]
    kb = {}
    for p in people:
        kb[p] = {r: rng.choice([q for q in people if q != p]) for r in ToolBackend.PERSON_RELATIONS}
        kb[p]["city"] = rng.choice(CITIES)
    return kb


@lru_cache(maxsize=4)
def default_backend(kb_seed: int = 0) -> ToolBackend:
    return ToolBackend(kb_seed)
