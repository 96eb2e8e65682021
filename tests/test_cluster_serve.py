"""`edge-genarm serve --ray ADDRESS --replicas 2` on a real two-node Ray cluster (Ray Serve,
two engine replicas, one endpoint), checked against the single-process server started with the
same options: the same answers to the official openai client, the same error bodies, prefix
affinity, per-replica metrics, the queue limit, and a replica killed mid-request."""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import ExitStack

import httpx
import openai
import pytest
import ray

from edge_genarm.serve.launch import local_server
from test_serve import ERRORS

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTIONS = ["--preset", "demo", "--threads", "1", "--parallel", "2", "--max-queue", "1",
           "--ctx-size", "256", "--max-tokens", "24", "--api-key", KEY]
SYSTEM = ("You are a ship's cook on a long voyage. Answer every question in a single line, "
          "with a nautical word somewhere in it, and never mention the weather.")


def replicas_of(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    return {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
            if line.startswith("edge_genarm_kv_cells{")} - {"total"}


def wait_for_replicas(url: str, n: int, timeout: float = 180) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            seen = replicas_of(url)
        except httpx.HTTPError:
            seen = set()
        if len(seen) == n:
            return seen
        assert time.monotonic() < deadline, f"{n} replicas not up in {timeout} s: {seen}"
        time.sleep(1)


@pytest.fixture(scope="module")
def servers(ray_cluster):
    """(the Ray Serve endpoint, the single-process server), both with OPTIONS."""
    command = [sys.executable, "-m", "edge_genarm", "serve", *OPTIONS]
    with ExitStack() as stack:
        ray_url = stack.enter_context(local_server(
            [*command, "--ray", ray_cluster.address, "--replicas", "2"], timeout=300,
            stop_timeout=60))
        wait_for_replicas(ray_url, 2)
        single = stack.enter_context(local_server(command, timeout=120))
        yield ray_url, single


def chat(url: str, question: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": question}], "max_tokens": 8} | extra)


def test_the_openai_client_gets_what_the_single_server_gives(servers):
    ray_url, single = servers
    answers = []
    for url in servers:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        ask = dict(model="demo", messages=[{"role": "user", "content": "Name a fruit."}],
                   temperature=0, max_tokens=12)
        whole = client.chat.completions.create(**ask)
        pieces = "".join(c.choices[0].delta.content or "" for c in
                         client.chat.completions.create(**ask, stream=True) if c.choices)
        assert pieces == whole.choices[0].message.content
        text = client.completions.create(model="demo", prompt="Once upon a time",
                                         temperature=0, max_tokens=8).choices[0].text
        models = [m.id for m in client.models.list()]
        answers.append((whole.choices[0].message.content, text, models))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0
                          ).models.list()
    assert answers[0] == answers[1]


def test_every_error_body_is_the_single_servers(servers):
    ray_url, single = servers
    requests = [("POST", "/v1/chat/completions",
                 body if isinstance(body, bytes) else json.dumps(body).encode(), AUTH)
                for body, *_ in ERRORS]
    requests += [("POST", "/v1/chat/completions", b"x" * (2 << 20), AUTH),
                 ("GET", "/v1/nothing", b"", AUTH), ("GET", "/v1/models", b"", {}),
                 ("GET", "/metrics", b"", {"Authorization": "Bearer wrong"}),
                 ("POST", "/v1/completions", b'{"prompt": [999999]}', AUTH),
                 ("GET", "/health", b"", {})]
    for method, path, body, headers in requests:
        got = [httpx.request(method, url + path, content=body, timeout=60,
                             headers=headers | {"content-type": "application/json"})
               for url in (ray_url, single)]
        assert got[0].status_code == got[1].status_code, (path, body[:80], got[0].text)
        assert got[0].json() == got[1].json(), (path, body[:80])
        assert got[0].headers.get("www-authenticate") == got[1].headers.get("www-authenticate")


def test_a_shared_prefix_stays_on_its_replica_and_the_rest_spreads(servers):
    ray_url, _ = servers
    first = chat(ray_url, "Hi")
    owner = first.headers["x-edge-genarm-replica"]
    for q in ("Name a colour.", "What is two plus two?", "Tell me a short fact."):
        r = chat(ray_url, q)
        assert r.status_code == 200 and r.headers["x-edge-genarm-replica"] == owner
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 20
    seen = {httpx.post(f"{ray_url}/v1/completions", headers=AUTH, timeout=120, json={
        "prompt": f"{i} is a number that", "max_tokens": 1}).headers["x-edge-genarm-replica"]
        for i in range(12)}  # no shared prefix: the least loaded, ties broken at random
    assert len(seen) == 2


def test_metrics_per_replica_and_total(servers):
    ray_url, _ = servers
    text = httpx.get(f"{ray_url}/metrics", headers=AUTH, timeout=30).text
    tokens = {line.split('replica="')[1].split('"')[0]: float(line.split()[-1])
              for line in text.splitlines()
              if line.startswith("edge_genarm_kv_cells{")}
    assert len(tokens) == 3 and tokens["total"] == sum(v for k, v in tokens.items()
                                                       if k != "total")


def test_the_queue_limit_answers_503_with_retry_after(servers):
    ray_url, _ = servers
    results: list = []

    def one():
        results.append(chat(ray_url, "Write a long essay about the sea.", max_tokens=64,
                            temperature=0.8))

    threads = [threading.Thread(target=one) for _ in range(14)]  # room: 2 x (2 + 1) + 2
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    refused = [r for r in results if r.status_code == 503]
    assert len(results) == 14 and refused and len(refused) < 14
    for r in refused:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    assert all(r.status_code in (200, 503) for r in results)


def test_a_killed_replica_fails_its_request_cleanly_and_comes_back(servers):
    ray_url, _ = servers
    owner = chat(ray_url, "Hi").headers["x-edge-genarm-replica"]
    answer: list = []
    waiting = threading.Thread(target=lambda: answer.append(
        chat(ray_url, "Write a long story about a storm.", max_tokens=200)))
    waiting.start()
    time.sleep(2)  # the request is on the owner, decoding
    ray.kill(ray.get_actor(f"SERVE_REPLICA::edge-genarm#EngineReplica#{owner}",
                           namespace="serve"), no_restart=True)
    waiting.join(120)
    [lost] = answer
    assert lost.status_code == 503 and lost.headers["retry-after"] == "1"
    assert lost.json()["error"]["code"] == "replica_lost"
    for _ in range(3):  # the other replica answers meanwhile
        assert chat(ray_url, "Name a colour.").status_code == 200
    back = wait_for_replicas(ray_url, 2)
    assert owner not in back
