"""timjax serve: each bad input gets a 4xx JSON error in its route's own shape (the official clients raise
their typed errors), a full queue gets 429 with Retry-After, the API key is required, per-request tool URLs
are refused unless allowed; the server goes on serving."""

from __future__ import annotations

import time

import pytest
import requests

from tests._serve_helpers import Uvicorn, tiny_tim, tools_app

KEY = "k-errors"
MODEL = "timjax-tiny-tim"


@pytest.fixture(scope="module")
def slow_tools():
    srv = Uvicorn(tools_app([], delay_s=4.0))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(slow_tools):
    from timjax.serve.app import create_app
    from timjax.serve.config import ServeConfig

    cfg = ServeConfig(
        api_key=KEY,
        max_seq_len=256,
        max_batch=1,
        max_queue=1,
        max_body_bytes=4096,
        allow_tool_url=[f"127.0.0.1:{slow_tools.port}"],
        max_step_tokens=16,  # warmup (background by default): 6 packed lengths x one KV window x masked or not
    )
    srv = Uvicorn(create_app(cfg, model=tiny_tim()))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oa(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def an(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def sub(server):
    from subconscious import Subconscious

    return Subconscious(api_key=KEY, base_url=server.url + "/v1")


def user(text):
    return [{"role": "user", "content": text}]


def test_the_server_compiles_its_steps_in_the_background(server):
    from timjax.runtime import steps

    assert requests.get(server.url + "/health").status_code == 200  # serving while it compiles
    t0 = time.monotonic()
    while "timjax_warmup_shapes_left 0.0" not in requests.get(server.url + "/metrics").text:
        assert time.monotonic() - t0 < 600, "the background warmup did not finish"
        time.sleep(0.5)
    # packed lengths 1, 2, 4, 8, 12, 16 (one slot, a 16-token budget: its pure decode step is the 1-token
    # one, which has no decode variant), one KV window (the 256-token table)
    assert steps.flat_generate_step._cache_size() == 6
    assert steps.flat_logits_step._cache_size() == 6


def test_malformed_bodies(server, oa, an):
    import anthropic
    import openai

    with pytest.raises(openai.BadRequestError, match="messages"):
        oa.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oa.chat.completions.create(model=MODEL, messages=user("hi"), temperature=5)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        an.messages.create(model=MODEL, max_tokens=0, messages=user("hi"))
    r = requests.post(
        server.url + "/v1/chat/completions", data=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(server.url + "/v1/messages", data=b"[1]", headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = requests.post(server.url + "/v1/runs", json={"engine": MODEL}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "input" in r.json()["error"]["message"]
    big = requests.post(
        server.url + "/v1/chat/completions", data=b"x" * 5000, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert big.status_code == 413 and "4096" in big.json()["error"]["message"]


def test_unknown_model(oa, an, sub):
    import anthropic
    import openai
    from subconscious.errors import ValidationError

    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        oa.chat.completions.create(model="gpt-9", messages=user("hi"))
    with pytest.raises(anthropic.NotFoundError, match="claude-9"):
        an.messages.create(model="claude-9", max_tokens=10, messages=user("hi"))
    with pytest.raises(ValidationError, match="tim-gpt"):
        sub.run(engine="tim-gpt", input={"instructions": "hi"})


def test_too_long_prompt(oa, an):
    import anthropic
    import openai

    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        oa.chat.completions.create(model=MODEL, messages=user("Calculate 1 + 1. " * 200))
    with pytest.raises(anthropic.BadRequestError, match="context is 256 tokens"):
        an.messages.create(model=MODEL, max_tokens=10, messages=user("Calculate 1 + 1. " * 200))


def test_bad_schema(oa, sub):
    import openai
    from subconscious.errors import ValidationError

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="response_format"):
        oa.chat.completions.create(model=MODEL, messages=user("Calculate 1 + 1."), response_format=bad)
    with pytest.raises(ValidationError, match="answerFormat"):
        sub.run(engine=MODEL, input={"instructions": "Calculate 1 + 1.", "answerFormat": {"type": 3}})


def test_bad_function_calling_requests(oa):
    import openai

    fn = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {}}}}
    other = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(openai.BadRequestError, match=r"tool_choice.*'nope' is not among the tools \(calc\)"):
        oa.chat.completions.create(model=MODEL, messages=user("hi"), tools=[fn], tool_choice=other)
    bad = {"type": "function", "function": {"name": "calc", "parameters": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]\.function\.parameters"):
        oa.chat.completions.create(model=MODEL, messages=user("hi"), tools=[bad])
    with pytest.raises(openai.BadRequestError, match=r"tools\[1\]\.function\.name"):
        oa.chat.completions.create(model=MODEL, messages=user("hi"), tools=[fn, fn])
    with pytest.raises(openai.BadRequestError, match="tool_choice: no tools"):
        oa.chat.completions.create(model=MODEL, messages=user("hi"), tool_choice="required")
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.tool_call_id"):
        oa.chat.completions.create(model=MODEL, messages=user("hi") + [{"role": "tool", "content": "1"}], tools=[fn])


def test_unknown_tool(sub, slow_tools):
    from subconscious.errors import ValidationError

    with pytest.raises(ValidationError, match="'websearch'"):
        sub.run(engine=MODEL, input={"instructions": "hi", "tools": [{"type": "platform", "id": "websearch"}]})
    mcp = {"type": "mcp", "url": slow_tools.url + "/mcp", "allowedTools": ["nope"]}
    with pytest.raises(ValidationError, match="'nope'"):
        sub.run(engine=MODEL, input={"instructions": "hi", "tools": [mcp]})
    with pytest.raises(ValidationError, match="tool type"):
        sub.run(engine=MODEL, input={"instructions": "hi", "tools": [{"type": "shell", "command": "ls"}]})


def test_tool_urls_refused_unless_allowed(sub, slow_tools):
    from subconscious.errors import ValidationError

    from timjax.serve.tools import url_allowed

    for url in ("http://127.0.0.1:9/mcp", "http://localhost:%d/mcp" % slow_tools.port, "file:///etc/passwd"):
        with pytest.raises(ValidationError, match="not allowed"):
            sub.run(engine=MODEL, input={"instructions": "hi", "tools": [{"type": "mcp", "url": url}]})
    fn = {"type": "function", "name": "f", "url": "http://169.254.169.254/latest/meta-data"}
    with pytest.raises(ValidationError, match="not allowed"):
        sub.run(engine=MODEL, input={"instructions": "hi", "tools": [fn]})
    # url_allowed is ToolPolicy.check_url under the server's policy (timjax/tools/policy.py)
    assert not url_allowed("http://127.0.0.1:8000/mcp", [])  # the default: no outbound call at all
    assert not url_allowed("https://api.example.com/x", [])
    assert url_allowed("http://127.0.0.1:8000/mcp", ["127.0.0.1:*"])  # loopback: only when listed
    assert url_allowed("http://127.0.0.1:8000/mcp", ["127.0.0.1"])  # a host without a port: any port
    assert not url_allowed("http://127.0.0.1:8000/mcp", ["*"]) and not url_allowed("http://localhost/x", ["*:*"])
    assert not url_allowed("http://[::1]:8000/mcp", ["*"]) and url_allowed("http://[::1]:8000/mcp", ["[::1]:8000"])
    assert url_allowed("http://127.0.0.1:8000/mcp", ["127.0.0.1:8000"])
    assert not url_allowed("http://127.0.0.1:8001/mcp", ["127.0.0.1:8000"])  # the port is part of the pattern
    assert url_allowed("https://api.example.com/x", ["*.example.com"])
    assert url_allowed("https://api.example.com/x", ["*.example.com:443"])  # the scheme's default port
    assert not url_allowed("http://api.example.com:8080/x", ["*.example.com:443"])
    assert not url_allowed("https://example.com.evil.net/x", ["*.example.com"])
    assert not url_allowed("http://user:pw@10.0.0.1/x", ["127.0.0.1:*"])
    assert url_allowed("https://api.example.com/v1/fn", ["https://api.example.com/v1/"])  # a URL prefix
    assert not url_allowed("http://api.example.com/v1/fn", ["https://api.example.com/v1/"])  # other scheme
    assert not url_allowed("https://api.example.com/v2/fn", ["https://api.example.com/v1/"])
    assert not url_allowed("https://api.example.com:8443/v1/fn", ["https://api.example.com/v1/"])
    assert not url_allowed("http://127.0.0.1:8000@evil.net/v1/", ["http://127.0.0.1:8000/"])  # user info trick
    assert not url_allowed("file:///etc/passwd", ["*"])


def test_api_key_required(server):
    import anthropic
    import openai
    from subconscious import Subconscious
    from subconscious.errors import AuthenticationError

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=user("hi")
        )
    with pytest.raises(AuthenticationError):
        Subconscious(api_key="k-error", base_url=server.url + "/v1").get("x")
    assert requests.get(server.url + "/v1/models").status_code == 401
    assert requests.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200


def test_full_queue_is_429_with_retry_after(server, sub, slow_tools):
    from subconscious.errors import RateLimitError

    tools = [{"type": "mcp", "url": slow_tools.url + "/mcp"}]
    first = sub.run(engine=MODEL, input={"instructions": "Calculate 2 + 5.", "tools": tools})
    t0 = time.monotonic()
    while sub.get(first.run_id).status == "queued" and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    second = sub.run(engine=MODEL, input={"instructions": "Calculate 2 + 5.", "tools": tools})  # waits
    with pytest.raises(RateLimitError):
        sub.run(engine=MODEL, input={"instructions": "Calculate 2 + 5."})
    r = requests.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": user("Calculate 2 + 5.")},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    for run in (second, first):
        assert sub.cancel(run.run_id).status == "canceled"
    assert requests.get(server.url + "/health").json()["queued"] == 0  # and it goes on serving
