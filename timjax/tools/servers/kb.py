"""A small generated knowledge base (people, cities, countries) and the ``lookup`` tool over it.

``generate_kb(seed)`` is deterministic (``random.Random(seed)``, nothing downloaded); the default KB is
``generate_kb(seed=0)``. Relations are single-valued, so a multi-hop question decomposes into one
``lookup(entity, relation)`` per hop, e.g. "the capital of the country where Ana Voss's friend was born":

    lookup("Ana Voss", "friend") -> {"result": "Ira Holm"}
    lookup("Ira Holm", "born_in") -> {"result": "Tarvik"}
    lookup("Tarvik", "country") -> {"result": "Olmara"}
    lookup("Olmara", "capital") -> {"result": "Sendal"}

Numbers (``age``, ``population``, ``area``) are integers, so questions can mix in the calculator.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from mcp.types import CallToolResult, ToolAnnotations

from timjax.tools.servers._answer import answer

__all__ = ["RELATIONS", "KnowledgeBase", "LookupError_", "generate_kb", "lookup", "make_server"]

PERSON_RELATIONS = ("born_in", "lives_in", "age", "occupation", "friend", "employer")
CITY_RELATIONS = ("country", "population")
COUNTRY_RELATIONS = ("capital", "continent", "area")
COMPANY_RELATIONS = ("based_in", "founded")
RELATIONS = PERSON_RELATIONS + CITY_RELATIONS + COUNTRY_RELATIONS + COMPANY_RELATIONS
Relation = Literal[RELATIONS]  # type: ignore[valid-type]

_ONSETS = ["b", "br", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "m"]
_OCCUPATIONS = ("baker", "teacher", "pilot", "engineer", "nurse", "farmer", "painter", "judge", "chemist", "sailor")
_CONTINENTS = ("North", "South", "East", "West")
_COMPANY_SUFFIX = ("Works", "Labs", "Foods", "Motors", "Press", "Bank")


@dataclass
class KnowledgeBase:
    """``facts[entity][relation] -> value`` (str or int); ``kinds[entity]`` is person/city/country/company."""

    seed: int
    facts: dict[str, dict[str, str | int]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def entities(self, kind: str | None = None) -> list[str]:
        return [e for e, k in self.kinds.items() if kind is None or k == kind]


class LookupError_(ValueError):
    """A lookup the KB cannot answer (its message is what the model reads)."""


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return w.capitalize()


def _unique(rng: random.Random, used: set, make) -> str:
    while True:
        name = make()
        if name.casefold() not in used:
            used.add(name.casefold())
            return name


def generate_kb(
    seed: int = 0, *, n_people: int = 60, n_cities: int = 16, n_countries: int = 6, n_companies: int = 10
) -> KnowledgeBase:
    """A deterministic KB: the same seed and sizes give the same facts, on any machine."""
    if min(n_people, n_cities, n_countries, n_companies) < 1 or n_cities < n_countries:
        raise ValueError("generate_kb needs at least one of each kind and n_cities >= n_countries")
    rng = random.Random(seed)
    kb = KnowledgeBase(seed=seed)
    used: set[str] = set()

    def add(kind, name, facts):
        kb.kinds[name] = kind
        kb.facts[name] = facts

    countries = [_unique(rng, used, lambda: _word(rng, rng.randint(2, 3))) for _ in range(n_countries)]
    cities = [_unique(rng, used, lambda: _word(rng, rng.randint(2, 3))) for _ in range(n_cities)]
    city_country = {c: countries[i] if i < n_countries else rng.choice(countries) for i, c in enumerate(cities)}
    for c in cities:
        add("city", c, {"country": city_country[c], "population": rng.randint(2, 900) * 1000})
    for i, k in enumerate(countries):
        add(
            "country",
            k,
            {"capital": cities[i], "continent": rng.choice(_CONTINENTS), "area": rng.randint(10, 2000) * 100},
        )
    companies = [
        _unique(rng, used, lambda: f"{_word(rng, 2)} {rng.choice(_COMPANY_SUFFIX)}") for _ in range(n_companies)
    ]
    for c in companies:
        add("company", c, {"based_in": rng.choice(cities), "founded": rng.randint(1850, 2020)})
    people = [_unique(rng, used, lambda: f"{_word(rng, rng.randint(1, 2))} {_word(rng, 2)}") for _ in range(n_people)]
    for p in people:
        friend = rng.choice([q for q in people if q != p]) if n_people > 1 else p
        add(
            "person",
            p,
            {
                "born_in": rng.choice(cities),
                "lives_in": rng.choice(cities),
                "age": rng.randint(18, 90),
                "occupation": rng.choice(_OCCUPATIONS),
                "friend": friend,
                "employer": rng.choice(companies),
            },
        )
    return kb


class LookupResult(TypedDict):
    result: int | str


def lookup(kb: KnowledgeBase, entity: str, relation: str) -> LookupResult:
    """``{"result": value}``; raises ``LookupError_`` for an unknown entity or a relation it lacks.
    Entity names match exactly, else ignoring case."""
    name = entity if entity in kb.facts else {e.casefold(): e for e in kb.facts}.get(entity.casefold())
    if name is None:
        raise LookupError_(f"unknown entity {entity!r}")
    facts = kb.facts[name]
    if relation not in facts:
        raise LookupError_(f"{entity!r} is a {kb.kinds[name]}; its relations are {', '.join(facts)}")
    return {"result": facts[relation]}


DESCRIPTION = (
    "Look up one fact in the knowledge base: the value of a relation of an entity (a person, city, "
    "country or company). People: born_in, lives_in, age, occupation, friend, employer. Cities: "
    "country, population. Countries: capital, continent, area. Companies: based_in, founded."
)

# a pure function: safe to retry after a crashed server restarts (timjax.tools.runner)
READ_ONLY = ToolAnnotations(readOnlyHint=True, idempotentHint=True)


def make_server(kb: KnowledgeBase | None = None, *, seed: int = 0, name: str = "kb"):
    """An MCP server with one tool, ``lookup(entity, relation)``, over ``kb`` (default ``generate_kb(seed)``)."""
    from mcp.server.mcpserver import MCPServer

    kb = kb if kb is not None else generate_kb(seed)
    server = MCPServer(name, log_level="WARNING")

    @server.tool(name="lookup", description=DESCRIPTION, annotations=READ_ONLY)
    def lookup_tool(entity: str, relation: Relation) -> CallToolResult:
        return answer(lambda: lookup(kb, entity, relation), LookupError_)

    return server


if __name__ == "__main__":  # python -m timjax.tools.servers.kb [--seed N]: serve over stdio
    ap = argparse.ArgumentParser(description="the timjax knowledge-base lookup MCP server (stdio)")
    ap.add_argument("--seed", type=int, default=0)
    make_server(seed=ap.parse_args().seed).run("stdio")
