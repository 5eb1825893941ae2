"""`internlm2-graph serve`: a real uvicorn server on a tiny chat model, driven by the openai client.

Random weights write gibberish, so tool calls are proven twice: the parser on crafted token
streams (unit level), and guidance on the real server (forced tool_choice, json_schema), whose
output must parse. One server per scheduler for the module (the tests share it, as clients
share a server): batched og.Generator (the CPU default) and og's static og.Engine.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from internlm2_graph.cli import main
from internlm2_graph.serve import tools
from internlm2_graph.serve.app import StopMatcher, create_app
from internlm2_graph.serve.engine import EngineBackend

pytestmark = pytest.mark.model  # every test here builds or runs a model

MODEL = "tiny-chat"
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "today's", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def folder(serving_folder) -> Path:
    return serving_folder


@pytest.fixture(scope="module", params=["generator", "engine"])
def server(folder, request):
    """The server, on each scheduler: batched og.Generator (the CPU's) and og.Engine."""
    backend = EngineBackend(folder, max_batch_size=16, scheduler=request.param)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(backend, MODEL), log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield url, backend
    uv.should_exit = True
    thread.join(10)
    backend.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def ask(client, text: str, stream: bool = False, **options):
    """The greedy reply to one user message: (content, finish_reason, usage)."""
    messages = [{"role": "user", "content": text}]
    options = {"max_tokens": 24, "temperature": 0, **options}
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=messages, **options)
        choice = reply.choices[0]
        return choice.message.content, choice.finish_reason, reply.usage
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **options,
    )
    text, finish, usage = "", None, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


def stats(server) -> dict:
    return httpx.get(server[0] + "/health").json()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert stats(server)["status"] == "ok"


def test_streamed_reply_is_the_reply(client):
    text, finish, usage = ask(client, "Tell me about rivers.")
    assert (text, finish) == ask(client, "Tell me about rivers.", stream=True)[:2]
    assert finish in ("stop", "length")
    assert usage.completion_tokens <= 24 and usage.prompt_tokens > 5
    assert usage.prompt_tokens_details.cached_tokens == 0  # a static batch caches no prefix


def test_sixteen_concurrent_clients_get_their_replies_alone(client):
    prompts = [f"Question {i}: what is {i} + {2 * i}?" * (1 + i % 3) for i in range(16)]
    alone = [ask(client, p)[0] for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(
            pool.map(lambda ip: ask(client, ip[1], stream=ip[0] % 2 == 1)[0], enumerate(prompts))
        )
    assert together == alone
    assert len(set(alone)) > 1  # different prompts, different replies: the test can fail


def test_completions(client):
    first = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0)
    streamed = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == first.choices[0].text
    assert first.usage.completion_tokens == 8 and first.choices[0].finish_reason == "length"


def test_stop_string_ends_the_reply(client):
    text, _, _ = ask(client, "Tell me about rivers.", max_tokens=40)
    stop = text[5:8]
    assert len(stop) == 3
    stopped, finish, _ = ask(client, "Tell me about rivers.", max_tokens=40, stop=[stop])
    assert (stopped, finish) == (text[: text.index(stop)], "stop")
    streamed = ask(client, "Tell me about rivers.", stream=True, max_tokens=40, stop=stop)
    assert streamed[:2] == (stopped, "stop")


@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_forced_tool_call_parses(client, choice):
    tool_choice = (
        choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    )
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    options = dict(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=120,
        temperature=0,
    )
    reply = client.chat.completions.create(**options)
    (call,) = reply.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    assert set(arguments) == set(schema["required"])
    if choice != "required":
        assert call.function.name == choice
    assert reply.choices[0].finish_reason == "tool_calls"
    # Streamed: the name first, then arguments in pieces that add up to the same JSON.
    pieces, names = [], []
    for chunk in client.chat.completions.create(stream=True, **options):
        for delta_call in chunk.choices[0].delta.tool_calls or ():
            names += [delta_call.function.name] if delta_call.function.name else []
            pieces.append(delta_call.function.arguments or "")
    assert names == [call.function.name]
    assert json.loads("".join(pieces)) == arguments and len(pieces) > 2


def test_json_schema_response(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    text, finish, _ = ask(client, "Weather?", max_tokens=60, response_format=fmt)
    value = json.loads(text)
    assert value["city"] in ("Paris", "Rome", "Oslo") and isinstance(value["sunny"], bool)
    assert finish == "stop"
    # Any object: random weights may write one long key, so only a finished one must parse.
    text, finish, _ = ask(
        client, "Anything", max_tokens=60, response_format={"type": "json_object"}
    )
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))


def test_tool_turns_render_in_internlm2_format(server):
    backend = server[1]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sunny": true}'},
    ]
    text = backend.render(tools.template_messages(messages, TOOLS[:1]))
    functions = json.dumps([TOOLS[0]["function"]])
    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>system name=<|plugin|>\n{functions}<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<|action_start|><|plugin|>\n{"name": "get_weather", '
        '"parameters": {"city": "Rome"}}<|action_end|><|im_end|>\n'
        '<|im_start|>environment name=<|plugin|>\n{"sunny": true}<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    ids = backend.encode(text)
    assert backend.special_ids.action_start in ids and backend.special_ids.plugin in ids


CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
BAD = [
    # (body or raw bytes, status, param)
    (
        {
            "model": MODEL,
            "messages": [{"role": "assistant", "tool_calls": [CALL]}],
        },
        400,
        "messages.0.tool_calls.0.function.arguments",
    ),
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": MODEL}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        400,
        "logprobs",
    ),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        400,
        "temperature",
    ),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
        400,
        "max_tokens",
    ),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 3000}]}, 400, "messages"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "frobnicate": 1},
        400,
        "frobnicate",
    ),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
        400,
        "tool_choice",
    ),
    (
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "response_format": {"type": "json_schema"},
        },
        400,
        "response_format",
    ),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_get_openai_errors(server, client, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        server[0] + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param or (param and error["param"].startswith(param))
    assert ask(client, "still there?", max_tokens=2)[1] in ("stop", "length")  # still serving


def test_unknown_route_is_an_openai_404(server):
    response = httpx.post(server[0] + "/v1/embeddings", json={})
    assert response.status_code == 404 and "error" in response.json()


def test_disconnecting_client_is_cancelled(server):
    before = stats(server)["finished"].get("CANCELLED", 0)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Go on and on."}],
        "max_tokens": 2000,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                break
    deadline = time.monotonic() + 20
    while (now := stats(server))["active_requests"] or now["finished"].get(
        "CANCELLED", 0
    ) == before:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert now["finished"]["CANCELLED"] == before + 1 and now["active_requests"] == 0


# ----- unit level: InternLM2's tool-call text, parsed as it streams -----

IDS = tools.SpecialIds(action_start=900, action_end=901, plugin=902)


def feed_all(parser: tools.ToolCallParser, stream: list) -> list:
    deltas = []
    for item in stream:
        token, text = (item, "") if isinstance(item, int) else (0, item)
        deltas += parser.feed(token, text)
    return deltas + parser.finish()


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_parser_streams_a_call_in_any_pieces(size):
    call = '{"name": "get_weather", "parameters": {"city": "Rome", "days": {"n": 2}}}'
    stream = [*pieces("Let me check. ", size), 900, 902, "\n", *pieces(call, size), 901]
    deltas = feed_all(tools.ToolCallParser(IDS), stream)
    content, calls = tools.collect(deltas)
    assert content == "Let me check. "
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Rome", "days": {"n": 2}}'}]
    assert isinstance(deltas[-1], tools.CallArguments)  # arguments arrive as deltas
    if size < 10:
        assert sum(isinstance(d, tools.CallArguments) for d in deltas) > 3


def test_parser_two_calls_other_order_and_no_calls():
    second = '{"parameters": {"zone": "UTC"}, "name": "get_time"}'
    first = '{"name":"a","arguments":{}}'
    stream = [900, 902, first, 901, 900, 902, "\n", second, 901]
    assert tools.collect(feed_all(tools.ToolCallParser(IDS), stream)) == (
        "",
        [{"name": "a", "arguments": "{}"}, {"name": "get_time", "arguments": '{"zone": "UTC"}'}],
    )
    # Not JSON, another action (<|interpreter|>), a model without the tokens: all content.
    assert tools.collect(feed_all(tools.ToolCallParser(IDS), [900, 902, "oops", 901]))[1] == []
    assert tools.collect(feed_all(tools.ToolCallParser(IDS), [900, 77, "x = 1"]))[0] == (
        "<|action_start|>x = 1"
    )
    assert tools.collect(feed_all(tools.ToolCallParser(None), ["a", 900, "b"])) == ("ab", [])


def test_parser_forced_call_and_cut_short():
    parser = tools.ToolCallParser(IDS, in_call=True)
    assert tools.collect(feed_all(parser, ['{"name": "f", "parameters": {"x": ', "1"])) == (
        "",
        [{"name": "f", "arguments": '{"x": 1'}],
    )


def test_stop_matcher_holds_back_a_stop_string_start():
    matcher = StopMatcher(["END", "zz"])
    out = [matcher.feed(piece) for piece in ["abc", "E", "N", "x", "yz", "E", "ND", "more"]]
    assert "".join(out) == "abcENxyz" and matcher.stopped
    assert out[1] == "" and out[3] == "ENx"


def test_cli_serve_without_a_folder_is_one_line(capsys, tmp_path):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a built model folder" in capsys.readouterr().err


def test_serving_benchmark_counts_every_token(folder):
    from benchmarks import serving

    params = {"folder": folder, "clients": [3], "paths": ["engine", "http", "chat"], "rounds": 1}
    rows = serving.run({**params, "prompt_tokens": 8, "output_tokens": 6, "max_length": 64})
    assert [row["path"] for row in rows] == ["engine", "http"]  # chat is one client only
    for row in rows:
        assert (row["requests"], row["output_tokens"]) == (3, 18)  # min_tokens fixes lengths
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] <= row["wall_s"]
    lengths = serving.mixed_requests(200, serving.random.Random(1))
    assert lengths == serving.mixed_requests(200, serving.random.Random(1))
    assert all(8 <= len(p) <= 256 and 8 <= n <= 128 for p, n in lengths)
    assert len({len(p) for p, _ in lengths}) > 20


def test_requests_arriving_together_share_one_static_batch(folder):
    """A static batch takes no request after its first step: the driver waits for the next
    request (batch_wait_ms) before starting one, so a burst runs as one batch, every first
    token before any reply ends (without the wait the first would run alone, the rest after)."""
    import asyncio

    from internlm2_graph.serve.engine import Finished, Sampling, Token

    backend = EngineBackend(folder, max_batch_size=8, batch_wait_ms=300)

    async def burst():
        log = []

        async def one(i):
            turn = backend.submit([1, 100 + i, 200 + i], Sampling(max_tokens=40, min_tokens=40))
            async for event in turn:
                if isinstance(event, Token) and not any(e == ("first", i) for e in log):
                    log.append(("first", i))
                elif isinstance(event, Finished):
                    log.append(("end", i))

        async def later(i):
            await asyncio.sleep(0.01 * i)
            await one(i)

        await asyncio.gather(*(later(i) for i in range(4)))
        return log

    try:
        log = asyncio.run(burst())
    finally:
        backend.close()
    kinds = [kind for kind, _ in log]
    assert kinds == ["first"] * 4 + ["end"] * 4, log


def test_seed_where_the_scheduler_takes_one(server, client):
    """og's static engine refuses a per-turn seed (a 400 naming it); generator batches take one,
    and the same seed gives the same sample."""
    options = {"max_tokens": 12, "temperature": 0.9, "seed": 7}
    if server[1].scheduler == "engine":
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, "Tell me a story.", **options)
        assert err.value.body["param"] == "seed"
    else:
        assert ask(client, "Tell me a story.", **options) == ask(
            client, "Tell me a story.", **options
        )
