"""`edge-genarm serve` as a user meets it: the real server on a free loopback port, driven by the
official `openai` package (sync and async), by raw HTTP for the errors, and by exactly what a chat
front end posts.

Equality between a request sent alone and the same request among others is checked by the
near-tie rule of the batch tests, on the server's own numbers: the token lists are equal, or at
the first difference the token the lone run chose is among the batched run's top alternatives
with a log-prob within 1.0 of the one it chose (batched and one-row kernels differ slightly).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from edge_genarm.cli import main as cli
from edge_genarm.serve.launch import local_server

MAX_TOKENS = 24
NEAR_TIE = 1.0
INF = float("inf")


@contextmanager
def running_server(*args: str, env: dict | None = None):
    """`edge-genarm serve ARGS` on a free loopback port until /health says 200 (at most 120 s);
    stopped (SIGINT, then kill) when the block ends."""
    with local_server([sys.executable, "-m", "edge_genarm", "serve", *args], "/health",
                      timeout=120, env=env, stop_timeout=20) as url:
        yield url


@pytest.fixture(scope="module")
def server():
    with running_server("--preset", "demo", "--parallel", "8", "--ctx-size", "256",
                        "--max-tokens", str(MAX_TOKENS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server):
    """A new async client for each event loop (a client's connections belong to one loop)."""
    return lambda: openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0,
                                      timeout=120)


def ask(text: str, **extra) -> dict:
    return dict(model="demo", messages=[{"role": "user", "content": text}], temperature=0,
                max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=5, **extra)


def tokens_of(choice) -> list:
    return list(choice.logprobs.content)


def same_or_near_tie(alone: list, batched: list) -> bool:
    """The rule in the module docstring, on two lists of chat log-prob entries."""
    for a, b in zip(alone, batched):
        if a.token != b.token:
            alternatives = {t.token: t.logprob for t in b.top_logprobs}
            return a.token in alternatives and b.logprob - alternatives[a.token] < NEAR_TIE
    return len(alone) == len(batched)


# -- the API through the official client -------------------------------------------------------
def test_a_chat_completion_streamed_and_not_say_the_same(client):
    full = client.chat.completions.create(**ask("Name three colours."))
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens == len(tokens_of(choice)) <= MAX_TOKENS
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.model == "demo" and full.object == "chat.completion"
    assert full.model_extra["arms"] == {"positive": 1.0, "concise": 0.0}
    chunks = list(client.chat.completions.create(**ask("Name three colours."), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert same_or_near_tie(tokens_of(choice), streamed)
    if [t.token for t in streamed] == [t.token for t in tokens_of(choice)]:
        assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(streamed)
    # the second run found the first one's prompt in the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == \
        chunks[-1].usage.prompt_tokens - 1


def test_a_completion_with_logprobs(client):
    out = client.completions.create(model="demo", prompt="The capital of France is",
                                    max_tokens=8, temperature=0, logprobs=3)
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        out.usage.completion_tokens
    assert all(len(top) == 3 and max(top.values()) >= v - 1e-6
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert "".join(lp.tokens).startswith(choice.text)


def test_n_3_gives_three_answers_from_one_prompt(client):
    story = [{"role": "user", "content": "Tell me a story."}]
    out = client.chat.completions.create(model="demo", n=3, temperature=1.0, seed=11,
                                         max_tokens=16, messages=story, logprobs=True)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 3
    one = client.chat.completions.create(model="demo", temperature=1.0, seed=11, max_tokens=16,
                                         messages=story)
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)


def test_per_request_arms_change_the_answer_and_keep_to_their_own_request(client, aclient):
    prompt = "Describe a rainy day."
    alone = {w: client.chat.completions.create(**ask(prompt, extra_body={"arms": {
        "positive": w}})) for w in (0.0, 3.0)}
    assert alone[0.0].model_extra["arms"]["positive"] == 0.0
    assert alone[0.0].choices[0].message.content != alone[3.0].choices[0].message.content

    async def both():
        async with aclient() as ac:
            return await asyncio.gather(*[ac.chat.completions.create(
                **ask(prompt, extra_body={"arms": {"positive": w}})) for w in (0.0, 3.0)])

    together = dict(zip((0.0, 3.0), asyncio.run(both())))
    for w in (0.0, 3.0):
        assert same_or_near_tie(tokens_of(alone[w].choices[0]),
                                tokens_of(together[w].choices[0])), w


def step_requests(url: str) -> dict[float, float]:
    """The server's histogram of requests given a token by one decode step, as cumulative
    counts by upper bound (inf: every step counted)."""
    text = httpx.get(f"{url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "edge_genarm_step_requests")
    counts = dict.fromkeys((1.0, 2.0, 4.0, 8.0, INF), 0.0)  # before the first step: none
    counts.update({float(s.labels["le"]): s.value for s in family.samples
                   if s.name.endswith("_bucket") and s.labels["model"] == "demo"})
    return counts


def test_twenty_concurrent_streams_each_equal_to_their_request_alone(server, client, aclient):
    prompts = ["Hi!", "What is rain?", "Name a fruit.", "Count to five.", "Say something nice.",
               "What is a cat?", "Give me a tip.", "Describe the sea.", "What is music?",
               "Why is the sky blue?"]
    requests = [ask(p, extra_body={"arms": {"positive": w}}) for p in prompts for w in (0.0, 1.5)]
    before = step_requests(server)
    alone = [tokens_of(client.chat.completions.create(**r).choices[0]) for r in requests]
    between = step_requests(server)
    steps = between[INF] - before[INF]
    # one request at a time: a step each token, and never two requests in one step
    assert steps >= len(requests) and between[1.0] - before[1.0] == steps

    async def stream(ac, r):
        got = []
        async for chunk in await ac.chat.completions.create(**r, stream=True):
            if chunk.choices and chunk.choices[0].logprobs:
                got += chunk.choices[0].logprobs.content
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return got, finish

    async def all_of_them():
        async with aclient() as ac:
            return await asyncio.wait_for(asyncio.gather(*[stream(ac, r) for r in requests]),
                                          300)

    results = asyncio.run(all_of_them())
    assert all(finish in ("stop", "length") for _, finish in results)
    # the streams really overlapped: steps decoded several of them, up to all --parallel 8
    after = step_requests(server)
    shared = (after[INF] - after[1.0]) - (between[INF] - between[1.0])
    assert shared >= MAX_TOKENS
    assert after[8.0] - after[4.0] > between[8.0] - between[4.0]
    for r, a, (b, _) in zip(requests, alone, results):
        assert same_or_near_tie(a, b), r["messages"]


def wait_until_idle(http, url: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while 'edge_genarm_requests_active{model="demo"} 0.0' not in http.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, "requests whose clients left kept running"
        time.sleep(0.1)


def _repeats_a_4gram(pieces: list[str]) -> bool:
    grams = [tuple(pieces[i:i + 4]) for i in range(len(pieces) - 3)]
    return len(set(grams)) < len(grams)


def test_penalties_change_a_looping_answer(client):
    """OpenAI's presence and frequency penalties, and DRY by llama-server's field names: a
    greedy answer that repeats itself, then with each penalty (DRY: no 4-gram twice)."""
    text = "Repeat after me: " + "the cat sat on the mat. " * 2 + "the cat sat on the mat."
    plain = client.chat.completions.create(**ask(text)).choices[0]
    assert _repeats_a_4gram([t.token for t in tokens_of(plain)])
    dry = client.chat.completions.create(**ask(text), extra_body={
        "dry_multiplier": 100, "dry_allowed_length": 3, "dry_sequence_breakers": []}).choices[0]
    assert not _repeats_a_4gram([t.token for t in tokens_of(dry)])
    assert dry.message.content != plain.message.content
    openai_style = client.chat.completions.create(**ask(text), presence_penalty=2,
                                                  frequency_penalty=2).choices[0]
    assert openai_style.message.content != plain.message.content


def test_a_client_that_leaves_mid_stream_frees_its_sequence(server, client):
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long essay."}],
                "max_tokens": 200, "stream": True}) as response:
            lines = response.iter_lines()
            assert [next(lines) for _ in range(6)]
        # the other 190-odd tokens would take seconds: gone within one means it was cancelled
        wait_until_idle(http, server, seconds=1.0)
    out = client.chat.completions.create(**ask("Hi!"))
    assert out.choices[0].message.content


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/made/up/path").status_code == 404
    text = httpx.get(f"{server}/metrics").text
    assert 'endpoint="other",status="404"' in text and "made/up" not in text
    for name in ("edge_genarm_requests_total", "edge_genarm_completion_tokens_total",
                 "edge_genarm_queue_depth", "edge_genarm_kv_cells_used",
                 "edge_genarm_time_to_first_token_seconds_bucket"):
        assert name in text
    done = [line for line in text.splitlines()
            if line.startswith('edge_genarm_completion_tokens_total{model="demo"}')]
    assert float(done[0].split()[-1]) > 0


def test_what_a_chat_front_end_posts(server):
    """Open WebUI's request: system message, history, streaming with usage, its headers."""
    body = {"model": "demo", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Hi!"},
                         {"role": "assistant", "content": "Hello! How can I help?"},
                         {"role": "user", "content": [{"type": "text",
                                                       "text": "Tell me about tea."}]}],
            "max_tokens": 16, "user": "someone", "metadata": {"chat_id": "x"}}
    headers = {"Accept": "text/event-stream", "Authorization": "Bearer sk-anything",
               "User-Agent": "open-webui"}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text and chunks[-1]["usage"]["completion_tokens"] <= 16
    assert chunks[-1]["usage"]["prompt_tokens"] > 40  # the whole history went in


# -- errors --------------------------------------------------------------------------------------
def msgs(text="Hi"):
    return [{"role": "user", "content": text}]


ERRORS = [  # (body, status, param, code, words in the message)
    (b'{"messages": [', 400, None, "invalid_json", "not valid JSON"),
    (b"[1, 2]", 400, None, "invalid_value", "the body"),
    ({"messages": msgs(), "temperature": -1}, 400, "temperature", "invalid_value",
     "temperature must be a finite number >= 0, got -1"),
    ({"messages": msgs(), "temperature": "hot"}, 400, "temperature", "invalid_value", "number"),
    ({"messages": msgs(), "top_p": 0}, 400, "top_p", "invalid_value", "top_p must be in (0, 1]"),
    ({"messages": msgs(), "n": 0}, 400, "n", "invalid_value", "n must be >= 1, got 0"),
    ({"messages": msgs(), "n": 9}, 400, "n", None, "at most 8"),
    ({"messages": msgs(), "max_tokens": 0}, 400, "max_tokens", "invalid_value",
     "greater than or equal to 1"),
    ({"messages": msgs(), "seed": -3}, 400, "seed", "invalid_value", "got -3"),
    ({"messages": msgs(), "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value",
     "between -2 and 2"),
    ({"messages": msgs(), "dry_multiplier": -1}, 400, "dry_multiplier", "invalid_value",
     "dry_multiplier must be a finite number >= 0"),
    ({"messages": msgs(), "dry_sequence_breakers": [""]}, 400, "dry_sequence_breakers",
     "invalid_value", "non-empty string"),
    ({"messages": msgs(), "method": "pargs"}, 400, "method", "invalid_value",
     "needs a reward model"),
    ({"messages": msgs(), "method": "prags"}, 400, "method", "invalid_value", "'best-of-n'"),
    ({"messages": msgs(), "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs",
     "invalid_value", "20"),
    ({"messages": msgs(), "stop": ["x"] * 17}, 400, "stop", None, "at most 16"),
    ({}, 400, "messages", "missing_required_parameter", "required"),
    ({"messages": []}, 400, "messages", "invalid_value", "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role",
     "invalid_value", "'user'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages.0.content.0.type", "invalid_value", "'text'"),
    ({"messages": msgs(), "model": "gpt-4o"}, 404, "model", "model_not_found", "demo"),
    ({"messages": msgs(), "arms": {"kindness": 1}}, 400, "arms", "unknown_arm",
     "positive, concise"),
    ({"messages": msgs(), "functions": [{"name": "f"}]}, 400, "functions",
     "unsupported_parameter", "not supported"),
    ({"messages": msgs(), "tools": [{"type": "function"}]}, 400, "tools[0].function",
     "invalid_value", "is required"),
    ({"messages": msgs(), "logit_bias": {"42": 500}}, 400, "logit_bias", "invalid_value", "100"),
    ({"messages": msgs(), "response_format": {"type": "json_schema"}}, 400, "response_format",
     "invalid_value", "json_schema is required"),
    ({"messages": msgs("word " * 400)}, 400, "messages", "context_length_exceeded",
     "--ctx-size"),
]


@pytest.mark.parametrize("body,status,param,code,words", ERRORS)
def test_bad_requests_get_openai_errors(server, body, status, param, code, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code, error
    assert words in error["message"] and error["type"] == (
        "not_found_error" if status == 404 else "invalid_request_error")


def test_other_bad_requests_and_the_server_goes_on(server, client):
    big = httpx.post(f"{server}/v1/chat/completions", content=b"x" * (2 << 20), timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server}/v1/nothing").status_code == 404
    assert httpx.post(f"{server}/v1/completions", json={"prompt": [999999]}).json()[
        "error"]["param"] == "prompt"
    echo = httpx.post(f"{server}/v1/completions", json={"prompt": "Hi", "echo": True})
    assert echo.status_code == 400 and echo.json()["error"]["param"] == "echo"
    ignored = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": msgs(), "max_tokens": 2, "user": "u", "store": False,
        "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "tools": [],
        "parallel_tool_calls": True, "service_tier": "auto"})
    assert ignored.status_code == 200, ignored.text
    assert client.chat.completions.create(**ask("Hi!")).choices[0].message.content


# -- limits: the queue and the API key -------------------------------------------------------
def test_queue_limit_and_api_key():
    with running_server("--preset", "demo", "--parallel", "1", "--max-queue", "1",
                        env={"EDGE_GENARM_API_KEY": "sekret"}) as url:
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "demo"
        body = {"messages": msgs("Write a long essay."), "max_tokens": 300, "stream": True}
        with httpx.Client(timeout=60, headers=auth) as http:
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as running, \
                    http.stream("POST", f"{url}/v1/chat/completions", json=body) as waiting:
                lines = [running.iter_lines(), waiting.iter_lines()]  # kept: dropping one closes
                assert all(next(line).startswith("data: ") for line in lines)
                refused = http.post(f"{url}/v1/chat/completions", json=body)
                assert refused.status_code == 503 and "Retry-After" in refused.headers
                assert refused.json()["error"]["code"] == "queue_full"
            wait_until_idle(http, url)  # the two streams' cancels reach the server first
            ok = http.post(f"{url}/v1/chat/completions", json=body | {"stream": False,
                                                                     "max_tokens": 4})
            assert ok.status_code == 200


def test_the_servers_system_message_leads_chats_that_bring_none():
    """`--system` (or a preset's system) as Ollama's SYSTEM: a chat without a system message gets
    it, one with its own keeps its own."""
    with running_server("--preset", "demo", "--parallel", "2", "--ctx-size", "256",
                        "--system", "Answer in one word.") as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def chat(*messages):
            reply = api.chat.completions.create(model="demo", messages=list(messages),
                                                temperature=0, max_tokens=12)
            return reply.choices[0].message.content, reply.usage.prompt_tokens

        user = {"role": "user", "content": "Name a colour."}
        given = chat({"role": "system", "content": "Answer in one word."}, user)
        assert chat(user) == given
        other = chat({"role": "developer", "content": "Answer in French."}, user)
        assert other != given and other[1] != given[1]


# -- the command ---------------------------------------------------------------------------------
def test_health_is_503_while_the_models_load(demo_base):
    """The app from `create_app`, its loader held at a gate until /health has answered."""
    from starlette.testclient import TestClient

    from edge_genarm.engine import Engine, EngineConfig
    from edge_genarm.llama import ContextSettings
    from edge_genarm.config import Config, LoadConfig
    from edge_genarm.scheduler import Scheduler
    from edge_genarm.serve.app import ServeConfig, create_app
    from edge_genarm.worker import Served

    gate = threading.Event()
    config = Config(LoadConfig(base=str(demo_base), ctx_size=256, parallel=1))

    def load():
        gate.wait(30)
        engine = Engine.load(EngineConfig(demo_base, [], ContextSettings(config.load.ctx_size)))
        return {"base": Served("base", config, engine, Scheduler(engine), None, 0)}

    with TestClient(create_app(ServeConfig(), load, lambda exc: None)) as http:
        loading = http.get("/health")
        assert loading.status_code == 503 and loading.headers["Retry-After"]
        assert http.get("/v1/models").json()["error"]["code"] == "model_loading"
        gate.set()
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert http.get("/v1/models").json()["data"][0]["id"] == "base"


def test_cors_is_off_unless_origins_are_named(demo_base):
    from starlette.testclient import TestClient

    from edge_genarm.engine import Engine, EngineConfig
    from edge_genarm.llama import ContextSettings
    from edge_genarm.config import Config, LoadConfig
    from edge_genarm.scheduler import Scheduler
    from edge_genarm.serve.app import ServeConfig, create_app
    from edge_genarm.worker import Served

    config = Config(LoadConfig(base=str(demo_base), ctx_size=128, parallel=1))

    def load():
        engine = Engine.load(EngineConfig(demo_base, [], ContextSettings(config.load.ctx_size)))
        return {"base": Served("base", config, engine, Scheduler(engine), None, 0)}

    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    for origins, allowed in (([], None), (["http://localhost:3000"], "http://localhost:3000")):
        with TestClient(create_app(ServeConfig(cors_origins=origins), load, print)) as http:
            got = http.options("/v1/chat/completions", headers=preflight)
            assert got.headers.get("access-control-allow-origin") == allowed
            other = http.options("/v1/chat/completions", headers=preflight | {
                "Origin": "http://evil.example"})
            assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("args,message", [
    (["--parallel", "0"], "Error: --parallel must be between 1 and"),
    (["--max-queue", "-1"], "Error: --max-queue must be >= 0, got -1"),
    (["--port", "70000"], "Error: --port must be between 0 and 65535, got 70000"),
    (["--preset", "nope"], "Error: no preset named 'nope'; the presets are demo"),
    (["--preset", "demo", "--preset", "demo"], "Error: a --preset is named twice"),
    (["--api-key", " "], "Error: --api-key is empty"),
])
def test_bad_serve_options_are_one_line(args, message):
    result = CliRunner().invoke(cli, ["serve", *args])
    assert result.exit_code != 0 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
    assert "another --port" in result.output


def test_an_answer_that_outgrows_the_context_ends_with_length(client):
    """The server's context is 256 tokens: an answer that reaches it ends there, as "length",
    while a request beside it goes on to its own end."""
    long_prompt = "one two three four five six seven eight nine ten " * 23

    async def both():
        async with openai.AsyncOpenAI(base_url=client.base_url, api_key="unused",
                                      max_retries=0, timeout=120) as ac:
            return await asyncio.gather(
                ac.completions.create(model="demo", prompt=long_prompt, max_tokens=200,
                                      temperature=0),
                ac.chat.completions.create(**ask("Hi!")))
    full, other = asyncio.run(both())
    assert full.choices[0].finish_reason == "length"
    # every one of the 256 positions decoded, and one last token sampled from the last logits
    assert full.usage.prompt_tokens + full.usage.completion_tokens == 257
    assert full.usage.completion_tokens < 200
    assert other.choices[0].message.content and other.usage.completion_tokens > 0
