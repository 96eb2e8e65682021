"""The Python API (`edge_genarm.load`) as a program uses it: against the CLI's own answers, from
several threads at once, streamed, in batches with per-item settings, as a chat, with the
reward-guided methods, and its bad input as one `UserError` line."""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner

import edge_genarm
from edge_genarm.cli import main
from edge_genarm.errors import EngineError

PROMPT = "Tell me about a rainy afternoon."


def cli_record(*args) -> dict:
    res = CliRunner().invoke(main, ["generate", "--json", *map(str, args)])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def demo():
    with edge_genarm.load("demo", parallel=4) as model:
        yield model


@pytest.fixture(scope="module")
def tiny_model(tiny):
    """The tiny F32 base with a LoRA ARM in exact mode: batched rows equal one-row decodes
    exactly, so concurrent calls must give exactly what each gives alone."""
    with edge_genarm.load(base=tiny.base, arms=[f"{tiny.lora}:1.5"], exact=True, raw=True,
                          ctx_size=128, parallel=6) as model:
        yield model


def test_generate_equals_the_cli(demo):
    ours = demo.generate(PROMPT, greedy=True, max_tokens=24, arms={"positive": 2.0})
    theirs = cli_record("--preset", "demo", "--greedy", "-n", 24, "--alpha", "positive=2",
                        PROMPT)
    assert (ours.text, ours.tokens, ours.prompt_ids) == \
        (theirs["text"], theirs["tokens"], theirs["prompt_ids"])
    assert ours.alphas == theirs["alphas"] == {"positive": 2.0, "concise": 0.0}
    assert ours.finish_reason == theirs["finish_reason"] == "length"
    assert ours.usage.completion_tokens == 24 and ours.usage.prompt_tokens == len(ours.prompt_ids)
    sampled = demo.generate(PROMPT, temperature=0.9, seed=7, max_tokens=16)
    assert sampled.tokens == cli_record("--preset", "demo", "-t", 0.9, "--seed", 7, "-n", 16,
                                        PROMPT)["tokens"]


def test_stream_pieces_make_the_answer_and_the_last_one_ends_it(demo):
    chunks = list(demo.stream(PROMPT, greedy=True, max_tokens=20, logprobs=3))
    whole = demo.generate(PROMPT, greedy=True, max_tokens=20)
    assert "".join(c.text for c in chunks) == whole.text
    assert [c.token for c in chunks if c.token is not None] == whole.tokens
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 20
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert all(len(c.logprob.top) == 3 and c.logprob.logprob <= 0 for c in chunks if c.token)


def test_a_stream_closed_early_cancels_its_request(demo):
    stream = demo.stream("Write a long story about the sea.", max_tokens=200)
    next(stream)
    stream.close()
    assert demo.generate("Hi!", greedy=True, max_tokens=4).usage.completion_tokens == 4
    assert demo._served.active == 0 and not demo._served.scheduler.busy


def test_concurrent_callers_each_get_what_they_get_alone(tiny_model):
    prompts = [f"the {w} sat on the" for w in ("cat", "dog", "bird", "fox", "cow", "owl")]
    alone = {p: tiny_model.generate(p, greedy=True, max_tokens=12).tokens for p in prompts}
    together, errors = {}, []

    def call(p):
        try:
            together[p] = tiny_model.generate(p, greedy=True, max_tokens=12).tokens
        except Exception as exc:  # noqa: BLE001 - the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and together == alone


def test_generate_batch_takes_per_item_settings(tiny_model):
    items = ["the cat sat on the", {"prompt": "the dog ran", "arms": {"lora": 0.0}},
             {"prompt": "the bird", "max_tokens": 3, "temperature": 1.0, "seed": 5}]
    got = tiny_model.generate_batch(items, greedy=True, max_tokens=10)
    assert [r.tokens for r in got] == [
        tiny_model.generate("the cat sat on the", greedy=True, max_tokens=10).tokens,
        tiny_model.generate("the dog ran", greedy=True, max_tokens=10, arms={"lora": 0}).tokens,
        tiny_model.generate("the bird", temperature=1.0, seed=5, max_tokens=3).tokens]
    assert got[1].alphas == {"lora": 0.0} and got[0].alphas == {"lora": 1.5}
    assert len(got[2].tokens) == 3


def test_as_completed_hands_back_a_bad_item_and_runs_the_others(tiny_model):
    too_long = "the cat " * 100  # over the 128-token context
    items = ["the cat sat on the", too_long, {"prompt": "the dog ran", "arms": {"nobody": 1}},
             {"prompt": "the bird", "n": 2, "temperature": 1.0, "seed": 3}]
    done = {c.index: c for c in tiny_model.as_completed(items, greedy=True, max_tokens=8)}
    assert sorted(done) == [0, 1, 2, 3]
    assert "context holds 128" in str(done[1].error) and not done[1].results
    assert "no ARM named 'nobody'" in str(done[2].error)
    assert done[0].error is None and done[0].results[0].tokens == \
        tiny_model.generate("the cat sat on the", greedy=True, max_tokens=8).tokens
    assert [r.seed for r in done[3].results] == [3, 4] and done[3].request.n == 2
    # the second answer is the one the same request alone gives with seed + 1
    assert done[3].results[1].tokens == \
        tiny_model.generate("the bird", temperature=1.0, seed=4, max_tokens=8).tokens


def test_a_token_id_prompt_and_should_stop(demo):
    ids = demo.generate(PROMPT, greedy=True, max_tokens=1).prompt_ids
    assert demo.generate(ids, greedy=True, max_tokens=6).tokens == \
        demo.generate(PROMPT, greedy=True, max_tokens=6).tokens
    seen = []
    for chunk in demo.stream(ids, greedy=True, max_tokens=40, should_stop=lambda: len(seen) >= 3):
        seen.append(chunk)
    last = seen[-1]
    assert last.finish_reason == "interrupted" and last.result.finish_reason == "interrupted"
    # tokens decoded before the stop reached the stepping thread still arrive; then it ends
    assert 3 <= len(last.result.tokens) < 40
    assert last.result.text == "".join(c.text for c in seen)

def test_chat_messages_and_the_system_default(demo):
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = demo.chat(messages, greedy=True, max_tokens=12)
    assert reply.prompt_ids == demo.generate("Name a colour.", greedy=True,
                                             max_tokens=1).prompt_ids
    told = demo.chat(messages, greedy=True, max_tokens=12, system="Answer in French.")
    assert told.prompt_ids == cli_record("--preset", "demo", "--greedy", "-n", 12, "--system",
                                         "Answer in French.", "Name a colour.")["prompt_ids"]


def test_reward_guided_methods_through_the_same_calls(demo):
    """A preset's reward model loads where the loaded method needs it (as on the command line);
    then each call picks its own method."""
    with pytest.raises(edge_genarm.UserError, match="needs a reward model"):
        demo.generate(PROMPT, method="pargs")
    with edge_genarm.load("demo", method="pargs", parallel=2) as model:
        ours = model.generate(PROMPT, reward_weight=2.0, greedy=True, max_tokens=12)
        theirs = cli_record("--preset", "demo", "--method", "pargs", "--reward-weight", 2,
                            "--greedy", "-n", 12, PROMPT)
        assert ours.tokens == theirs["tokens"]
        assert ours.method == {"method": "pargs", "reward_weight": 2.0, "candidates": 10}
        genarm = model.generate(PROMPT, method="genarm", greedy=True, max_tokens=12)
        assert genarm.tokens == demo.generate(PROMPT, greedy=True, max_tokens=12).tokens


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate(PROMPT, temprature=1.0), "unknown option 'temprature'"),
    (lambda m: m.generate(PROMPT, temperature=-1), "temperature must be a finite number >= 0"),
    (lambda m: m.generate(PROMPT, arms={"nope": 1.0}), "no ARM named 'nope'"),
    (lambda m: m.generate_batch([{"arms": {}}]), 'needs "prompt" or "messages"'),
    (lambda m: m.chat([]), "non-empty list"),
    (lambda m: m.chat([{"text": "hi"}]), "{'role', 'content'}"),
    (lambda m: m.generate(PROMPT, seed=1.5), "seed must be an integer, not 1.5"),
    (lambda m: m.generate(PROMPT, n=0), "n must be >= 1, got 0"),
    (lambda m: m.generate(PROMPT, n=5), "n must be between 1 and 4 (the parallel sequences)"),
    (lambda m: m.generate(PROMPT, logprobs=21), "logprobs must be between 0 and 20, got 21"),
    (lambda m: m.generate(PROMPT, method="prags"), "method must be one of genarm, pargs, args, best-of-n, search, got 'prags'"),
])
def test_bad_calls_raise_one_user_error_and_the_model_goes_on(demo, call, message):
    with pytest.raises(edge_genarm.UserError, match=None) as info:
        call(demo)
    assert message in str(info.value) and "\n" not in str(info.value)
    named = {"temperature": "temperature", "seed": "seed", "n must": "n", "top logprobs":
             "logprobs", "unknown method": "method", "no ARM": "arms"}
    for start, param in named.items():  # the option at fault, for a caller to point at
        if message.startswith(start) or start in message:
            assert info.value.param == param
    assert demo.generate("Hi!", greedy=True, max_tokens=2).usage.completion_tokens == 2


def test_bad_loads_and_a_closed_model(tiny):
    with pytest.raises(edge_genarm.UserError, match="unknown option 'ctx'"):
        edge_genarm.load("demo", ctx=128)
    with pytest.raises(edge_genarm.UserError, match="no preset named|unknown preset"):
        edge_genarm.load("no-such-preset")
    with pytest.raises(edge_genarm.UserError, match="parallel must be"):
        edge_genarm.load(base=tiny.base, raw=True, parallel=0)
    model = edge_genarm.load(base=tiny.base, raw=True, ctx_size=64, parallel=1)
    model.close()
    with pytest.raises(edge_genarm.UserError, match="closed"):
        model.generate("the cat")


def test_a_failing_step_fails_its_requests_and_the_model_goes_on(tiny_model, capsys):
    """A bug inside a step (here, a step that raises once) fails the requests it held with
    EngineError instead of leaving their callers waiting; the next call is answered."""
    scheduler = tiny_model.scheduler
    step = scheduler.step
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in a step")
        return step()
    scheduler.step = broken
    try:
        with pytest.raises(EngineError, match="internal error: RuntimeError: a bug in a step"):
            tiny_model.generate("the cat sat on the", greedy=True, max_tokens=12)
        assert "a bug in a step" in capsys.readouterr().err  # the traceback, for a bug report
        again = tiny_model.generate("the cat sat on the", greedy=True, max_tokens=12,
                                    ignore_eos=True)
    finally:
        del scheduler.step
    assert len(again.tokens) == 12
