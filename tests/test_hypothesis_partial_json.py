"""A partial tree always comes back: ``close_partial_json`` at every cut point of TIM documents and of random
JSON returns a value that is a prefix-consistent view of the full document (issue 10)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timjax.tim.partial_json import close_partial_json
from timjax.tim.traces import serialise, synthetic_document

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def consistent(part, full) -> bool:
    """``part`` is a view of ``full`` cut short: strings are prefixes, other scalars final, containers hold a
    prefix of the final members of which only the last may be incomplete."""
    if isinstance(full, dict):
        if not isinstance(part, dict) or list(part) != list(full)[: len(part)]:
            return False
        keys = list(part)
        return all(part[k] == full[k] for k in keys[:-1]) and (not keys or consistent(part[keys[-1]], full[keys[-1]]))
    if isinstance(full, list):
        if not isinstance(part, list) or len(part) > len(full):
            return False
        return all(a == b for a, b in zip(part[:-1], full)) and (not part or consistent(part[-1], full[len(part) - 1]))
    if isinstance(full, str):
        return isinstance(part, str) and full.startswith(part)
    if isinstance(full, float) and math.isnan(full):
        return isinstance(part, float) and math.isnan(part)
    return type(part) is type(full) and part == full


def check_every_cut(text: str, full) -> None:
    opened = False
    for n in range(len(text) + 1):
        prefix = text[:n]
        opened = opened or any(c in "[{" for c in prefix)
        got = close_partial_json(prefix)
        if opened:  # a container has started: a value always comes back
            assert got is not None, prefix
        if got is not None:
            assert consistent(got, full), (prefix, got)
    assert close_partial_json(text) == full


@pytest.mark.parametrize("depth,breadth,seed", [(3, 2, 0), (4, 1, 1), (2, 3, 2)])
def test_every_cut_of_a_tim_document(depth, breadth, seed):
    doc = synthetic_document(depth=depth, breadth=breadth, roots=2, words=6, seed=seed)
    check_every_cut(serialise(doc), doc)


CUTS = {  # the cut points named in issue 10, each with what must come back
    '{"reasoning": [{"thought": "a", "': {"reasoning": [{"thought": "a"}]},
    '{"a": "x", "b': {"a": "x"},
    '{"a": "x", ': {"a": "x"},
    '{"a": "x\\': {"a": "x"},
    '{"a": "x\\u12': {"a": "x"},
    '{"a": "x\\ud83d': {"a": "x"},
    '{"a": "x\\ud83d\\ude00': {"a": "x\U0001f600"},
    '{"a": -': {},
    '{"a": 1.': {},
    '{"a": 1e': {},
    '{"a": 12': {},
    '{"a": 12,': {"a": 12},
    '{"a": tru': {},
    '{"a": nul': {},
    '{"a": null': {"a": None},
    '{"a": [1, 2': {"a": [1]},
    '{"a":': {},
    '{"a"': {},
    "[": [],
    "{": {},
}


@pytest.mark.parametrize("prefix", list(CUTS))
def test_named_cut_points(prefix):
    assert close_partial_json(prefix) == CUTS[prefix]


def test_bytes_cut_inside_a_utf8_character():
    data = json.dumps({"t": "caf\u00e9 \u4e2d"}, ensure_ascii=False).encode()
    for n in range(len(data) + 1):
        got = close_partial_json(data[:n])
        assert got is None or consistent(got, {"t": "caf\u00e9 \u4e2d"}), data[:n]


def test_tim_controller_reexport():
    from timjax.engine import tim_controller

    assert tim_controller.close_partial_json is close_partial_json


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=12,
)
layouts = st.sampled_from([{}, {"ensure_ascii": False}, {"separators": (",", ":")}, {"indent": 1}])


@FAST
@given(
    doc=st.one_of(st.lists(json_values, max_size=4), st.dictionaries(st.text(max_size=5), json_values, max_size=4)),
    layout=layouts,
    data=st.data(),
)
def test_random_json_random_cuts(doc, layout, data):
    text = json.dumps(doc, **layout)
    full = json.loads(text)  # floats round-trip through their repr; -0.0 and 0.0 compare equal anyway
    for _ in range(5):
        n = data.draw(st.integers(0, len(text)))
        got = close_partial_json(text[:n])
        assert got is not None if n else got is None
        assert consistent(got, full) if n else True, (text[:n], got)
    assert close_partial_json(text) == full


@FAST
@given(depth=st.integers(1, 4), breadth=st.integers(1, 3), seed=st.integers(0, 10**6), data=st.data())
def test_random_tim_documents_random_cuts(depth, breadth, seed, data):
    doc = synthetic_document(depth=depth, breadth=breadth, roots=data.draw(st.integers(1, 2)), words=4, seed=seed)
    text = serialise(doc)
    for _ in range(10):
        n = data.draw(st.integers(1, len(text)))
        got = close_partial_json(text[:n].encode())
        assert isinstance(got, dict) and consistent(got, doc), (text[:n], got)
