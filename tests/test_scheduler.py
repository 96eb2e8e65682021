"""The request scheduler on real llama.cpp contexts.

Tiny F32 models with an F32 cache (`exact`) make batched and one-row kernels agree to about 1e-5,
so there a request's tokens in a mixed batch must equal the same request alone, exactly; the demo
preset (8-bit weights) is held to the near-tie rule of the batch tests.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

import llama_cpp
from conftest import answers, make_engine, reference_log_softmax
from edge_genarm import penalties
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.errors import EngineError, UserError
from edge_genarm.generation import encode_prompt
from edge_genarm.llama import ContextSettings
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler, Usage
from tiny_models import TinySpec, write_tiny_model

GREEDY = SamplingSettings(greedy=True)


def sampling(t: float) -> SamplingSettings:
    return SamplingSettings(temperature=t, top_k=0, top_p=1.0, min_p=0.0) if t else GREEDY


@pytest.fixture
def engine(tiny):
    with make_engine(tiny.base, [(tiny.lora, 0.0), (tiny.arm, 0.0)], n_seq_max=8,
                     n_ctx=128) as e:
        yield e


def ids(engine, text: str) -> tuple[int, ...]:
    return tuple(engine.model.tokenize(text, add_special=True))


def one_answer(engine, request: Request) -> tuple[list[int], Usage]:
    """A request decoded alone by a scheduler of its own: its tokens and usage."""
    with Scheduler(engine) as s:
        h = s.submit(request)
        return answers(s, [h])[(h, 0)]


def alone(tiny, request: Request) -> list[int]:
    with make_engine(tiny.base, [(tiny.lora, 0.0), (tiny.arm, 0.0)], n_ctx=128) as e:
        s = Scheduler(e)
        h = s.submit(request)
        return answers(s, [h])[(h, 0)][0]


MIXED = [({}, 0.0, 1), ({"lora": 0.5}, 0.7, 2), ({"lora": 1.0}, 1.0, 3), ({"lora": 2.0}, 0.0, 4),
         ({"lora": -1.0}, 1.3, 5), ({"lora": 1.0, "arm": 0.5}, 0.9, 6), ({"arm": 2.0}, 0.0, 7),
         ({"lora": 0.5, "arm": -1.0}, 1.1, 8)]
TEXTS = ["Hello world", "The weather today is", "Once upon a time", "My favourite food",
         "In the morning I", "Numbers: 1 2 3", "A quick brown fox", "Dear friend,"]


def mixed_requests(engine) -> list[Request]:
    return [Request(ids(engine, text), sampling(t), max_tokens=16, seed=seed, arms=arms)
            for text, (arms, t, seed) in zip(TEXTS, MIXED)]


def test_a_mixed_batch_gives_each_request_its_own_answer(tiny, engine):
    """Eight requests with their own ARM weights (0, 0.5, 1, 2, -1, two ARMs at once),
    temperatures and seeds share every step; each answer equals the request run alone."""
    scheduler = Scheduler(engine)
    requests = mixed_requests(engine)
    handles = [scheduler.submit(r) for r in requests]
    got = answers(scheduler, handles)
    distinct = set()
    for h, r in zip(handles, requests):
        tokens, usage = got[(h, 0)]
        assert tokens == alone(tiny, r), r.arms
        assert usage.completion_tokens == len(tokens) and usage.finish_reason in ("stop",
                                                                                 "length")
        distinct.add(tuple(tokens))
    assert len(distinct) == len(requests)


def test_the_same_prompt_with_other_weights_gives_other_answers(engine):
    scheduler = Scheduler(engine)
    prompt = ids(engine, "Hello world")
    handles = [scheduler.submit(Request(prompt, GREEDY, max_tokens=12, arms={"lora": w}))
               for w in (0.0, 2.0, -2.0)]
    got = answers(scheduler, handles)
    assert len({tuple(got[(h, 0)][0]) for h in handles}) == 3


def test_cancelling_one_leaves_the_others_and_frees_its_cells_at_once(tiny, engine):
    scheduler = Scheduler(engine)
    requests = mixed_requests(engine)[:4]
    handles = [scheduler.submit(r) for r in requests]
    tokens = {h: [] for h in handles}
    for _ in range(5):
        for event in scheduler.step():
            if event.token is not None:
                tokens[event.handle].append(event.token)
    victim = handles[1]
    seq_id = next(s.seq.seq_id for s in scheduler._slots if s.handle is victim)
    assert engine.base.seq_end(seq_id) > 0
    scheduler.cancel(victim)
    late = scheduler.submit(Request(ids(engine, "Hello"), GREEDY, max_tokens=4))
    events = scheduler.step()
    assert [e.finish_reason for e in events if e.handle is victim] == ["cancelled"]
    assert victim.done
    assert engine.base.seq_end(seq_id) == 0 or any(  # its cells were freed, and may be reused
        s.seq.seq_id == seq_id and s.handle is late for s in scheduler._slots)
    for event in events + list(scheduler.run()):
        if event.token is not None and event.handle in tokens:
            tokens[event.handle].append(event.token)
    for h, r in zip(handles, requests):
        if h is not victim:
            assert tokens[h] == alone(tiny, r)
    assert late.done


def test_n_answers_decode_the_prompt_once_and_each_equals_its_own_seed(tiny, engine):
    scheduler = Scheduler(engine)
    prompt = ids(engine, "The weather today is")
    request = Request(prompt, sampling(1.0), max_tokens=12, seed=40, n=4, arms={"lora": 1.0})
    handle = scheduler.submit(request)
    before = engine.base.n_decoded
    events = scheduler.step()
    assert engine.base.n_decoded - before == len(prompt)  # one prefill for the four answers
    assert sorted(e.index for e in events) == [0, 1, 2, 3]
    got = answers(scheduler, [handle])
    for e in events:
        got[(handle, e.index)][0].insert(0, e.token)
    texts = set()
    for j in range(4):
        own = alone(tiny, Request(prompt, sampling(1.0), max_tokens=12, seed=40 + j,
                                  arms={"lora": 1.0}))
        assert got[(handle, j)][0] == own
        texts.add(tuple(own))
    assert len(texts) == 4


def test_a_shared_prefix_is_copied_not_decoded_again(tiny, engine):
    scheduler = Scheduler(engine)
    system = "You are a helpful assistant. Answer briefly and kindly. "
    first = Request(ids(engine, system + "Hello"), GREEDY, max_tokens=8, arms={"lora": 1.0})
    second = Request(ids(engine, system + "Goodbye"), GREEDY, max_tokens=8, arms={"arm": 1.0})
    shared = next(i for i, (a, b) in enumerate(zip(first.prompt_ids, second.prompt_ids))
                  if a != b)
    h1, h2 = scheduler.submit(first), scheduler.submit(second)
    before = engine.base.n_decoded
    got = answers(scheduler, [h1, h2])
    assert got[(h2, 0)][1].cached_tokens == shared > 10
    prefill = len(first.prompt_ids) + len(second.prompt_ids) - shared
    steps = sum(len(got[(h, 0)][0]) - 1 for h in (h1, h2))
    assert engine.base.n_decoded - before == prefill + steps
    assert got[(h1, 0)][0] == alone(tiny, first)
    assert got[(h2, 0)][0] == alone(tiny, second)  # the ARM context caught up on the prefix


def test_a_finished_conversation_is_reused_by_its_next_turn(engine):
    scheduler = Scheduler(engine)
    turn1 = ids(engine, "Hello there")
    h1 = scheduler.submit(Request(turn1, GREEDY, max_tokens=6))
    reply = answers(scheduler, [h1])[(h1, 0)][0]
    turn2 = turn1 + tuple(reply) + tuple(engine.model.tokenize(" And then?", False))
    h2 = scheduler.submit(Request(turn2, GREEDY, max_tokens=6))
    got = answers(scheduler, [h2])
    assert got[(h2, 0)][1].cached_tokens == len(turn1) + len(reply) - 1


def test_logprobs_are_the_guided_distributions(engine):
    scheduler = Scheduler(engine)
    prompt = ids(engine, "Hello world")
    request = Request(prompt, GREEDY, max_tokens=3, arms={"lora": 1.5}, logprobs=3)
    handle = scheduler.submit(request)
    events = [e for e in scheduler.run([handle]) if e.token is not None]
    alphas = engine.alphas({"lora": 1.5})
    seq = engine.new_sequence()
    row = engine.step([seq], [list(prompt)], alphas[None])[0]
    lp = reference_log_softmax(row)
    first = events[0].logprob
    assert first.token == int(np.argmax(lp))
    assert abs(first.logprob - lp[first.token]) < 1e-4
    assert [t for t, _ in first.top] == list(np.argsort(-lp)[:3])
    assert all(abs(v - lp[t]) < 1e-4 for t, v in first.top)


def test_an_answer_that_outgrows_the_context_ends_alone(engine):
    scheduler = Scheduler(engine)
    long_prompt = ids(engine, "word " * 100)
    short = Request(ids(engine, "Hi"), GREEDY, max_tokens=40)
    h_long = scheduler.submit(Request(long_prompt, GREEDY, max_tokens=100))
    h_short = scheduler.submit(short)
    got = answers(scheduler, [h_long, h_short])
    assert got[(h_long, 0)][1].finish_reason == "context_full"
    assert len(long_prompt) + len(got[(h_long, 0)][0]) == engine.n_ctx + 1
    assert got[(h_short, 0)][1].finish_reason == "length"


def test_bad_requests_are_refused_at_submit(engine):
    scheduler = Scheduler(engine)
    prompt = ids(engine, "Hi")
    cases = [(Request(prompt, arms={"nosuch": 1.0}), "no ARM named 'nosuch'; the ARMs are lora, "
              "arm"),
             (Request(prompt, arms={"lora": float("nan")}), "arms lora must be a finite number, "
              "got nan"),
             (Request(ids(engine, "word " * 200)), "the prompt is 201 tokens but the context "
              "holds 128"),
             (Request(prompt, n=9), "n must be between 1 and 8"),
             (Request(prompt, logprobs=50), "logprobs must be between 0 and 20"),
             (Request(prompt, sampling=SamplingSettings(top_p=0)), "top_p must be in (0, 1]")]
    for request, message in cases:
        with pytest.raises(UserError, match=None) as err:
            scheduler.submit(request)
        assert str(err.value).startswith(message), str(err.value)
    assert not scheduler.busy


def test_submit_and_cancel_from_another_thread_while_stepping(engine):
    scheduler = Scheduler(engine)
    prompt = ids(engine, "Hello world")
    handles, done = [], threading.Event()

    def client():
        for k in range(6):
            handles.append(scheduler.submit(Request(prompt, GREEDY, max_tokens=8, seed=k)))
        scheduler.cancel(handles[2])
        done.set()

    thread = threading.Thread(target=client)
    thread.start()
    finished = set()
    deadline = time.monotonic() + 120  # bounded in time: steps with nothing to do are instant
    while time.monotonic() < deadline:
        for event in scheduler.step():
            if event.finish_reason:
                finished.add((event.handle, event.finish_reason))
        if done.is_set() and not scheduler.busy:
            break
    thread.join(timeout=10)
    assert len(handles) == 6 and all(h.done for h in handles)
    assert {r for h, r in finished if h is not handles[2]} <= {"length", "stop"}


def test_kv_cells_shared_by_all_sequences_admit_what_fits(tiny):
    """A cache of 256 cells for 4 sequences of up to 128 tokens (llama.cpp rounds cells up to a
    multiple of 256): requests that may grow to 100 tokens each run two at a time, never three,
    and all finish."""
    settings = ContextSettings(n_ctx=128, n_seq_max=4, n_cells=256, exact=True)
    config = EngineConfig(tiny.base, [ArmSpec(tiny.lora, 0.0, "lora")], settings)
    with Engine.load(config) as engine:
        scheduler = Scheduler(engine)
        prompt = ids(engine, "Hello world")
        assert engine.base.n_cells == 256
        requests = [Request(prompt, sampling(1.0), max_tokens=100 - len(prompt), seed=k,
                            arms={"lora": 1.0}) for k in range(4)]
        handles = [scheduler.submit(r) for r in requests]
        most = 0
        for _ in range(200):
            scheduler.step()
            most = max(most, len(scheduler._slots))
            if all(h.done for h in handles):
                break
        assert all(h.done for h in handles) and most == 2
        with pytest.raises(UserError, match="need more KV cells than the cache holds"):
            scheduler.submit(Request(prompt, max_tokens=120, n=3))


def test_sequence_ids_come_from_the_engine_and_go_back(engine):
    """The engine's pool of n_seq_max ids: a request takes one per answer, cancelling gives
    them back at once, a finished answer keeps its id idle (its cache a prefix for later
    prompts) until the scheduler closes, and an empty pool is refused, not shared."""
    prompt = ids(engine, "Hello world")
    assert engine.free_sequences == 8
    with Scheduler(engine) as scheduler:
        handle = scheduler.submit(Request(prompt, GREEDY, max_tokens=8, n=3))
        scheduler.step()
        assert engine.free_sequences == 5
        scheduler.cancel(handle)
        scheduler.step()
        assert engine.free_sequences == 8 and handle.done
        answers(scheduler, [scheduler.submit(Request(prompt, GREEDY, max_tokens=4))])
        assert engine.free_sequences == 7
        held = [engine.new_sequence() for _ in range(7)]
        with pytest.raises(EngineError, match="all 8 sequence ids are in use"):
            engine.new_sequence()
        for seq in held:
            engine.release(seq)
    assert engine.free_sequences == 8


def test_ignore_eos_runs_the_answer_to_max_tokens(demo_base):
    """The same greedy request, once as it is and once with `ignore_eos`, each decoded alone:
    the first ends with the model's end-of-generation token well before max_tokens; the second
    gives the same tokens up to there and then goes on to exactly max_tokens."""
    with make_engine(demo_base, n_ctx=256) as e:
        prompt = tuple(encode_prompt(e, "What is 2 + 2? Answer with a number only."))
        runs = {ignore: one_answer(e, Request(prompt, GREEDY, max_tokens=60, ignore_eos=ignore))
                for ignore in (False, True)}
        (ended, usage), (full, full_usage) = runs[False], runs[True]
        assert usage.finish_reason == "stop" and e.model.is_eog(ended[-1]) and len(ended) < 20
        assert full_usage.finish_reason == "length" and len(full) == 60
        assert full[:len(ended) - 1] == ended[:-1] and not any(map(e.model.is_eog, full))


def _first_repeat(tokens: list[int], n: int) -> int | None:
    """The index of the token that first completes an n-gram seen before, if any."""
    seen = set()
    for i in range(n - 1, len(tokens)):
        gram = tuple(tokens[i - n + 1:i + 1])
        if gram in seen:
            return i
        seen.add(gram)
    return None


def test_dry_stops_a_greedy_loop_where_it_would_begin(demo_base):
    """A greedy answer that repeats itself, then the same request with DRY (repeats of 3 tokens
    allowed, a penalty no log-prob outweighs, no breakers): the two agree up to the token that
    would first repeat a 4-gram, the penalized one takes another there, and no 4-gram of it
    occurs twice."""
    dry = dataclasses.replace(GREEDY, dry_multiplier=100.0, dry_allowed_length=3,
                              dry_sequence_breakers=())
    with make_engine(demo_base, n_ctx=256) as e:
        prompt = tuple(encode_prompt(e, "Write the word 'yes' fifty times, one per line."))
        plain, penalized = (one_answer(e, Request(prompt, settings, max_tokens=64,
                                                  ignore_eos=True))[0]
                            for settings in (GREEDY, dry))
    at = _first_repeat(plain, 4)
    assert at is not None, "the prompt no longer makes the greedy answer repeat itself"
    assert penalized[:at] == plain[:at] and penalized[at] != plain[at]
    assert _first_repeat(penalized, 4) is None and len(penalized) == 64


def test_dry_at_the_shipped_setting_decodes_as_llama_cpps_sampler(smollm2):
    """SmolLM2, greedy, loops ("I'm ready to help." again and again). With DRY as the coder
    presets set it (multiplier 0.8; llama.cpp's base 1.75, allowed length 2 and breakers), at
    every step edge-genarm's penalized row equals llama.cpp's DRY sampler fed the answer so far
    and applied to that step's logits, and the scheduler takes its argmax; the plain answer
    takes the logits' own, so the two part exactly where llama.cpp's penalty moves the argmax."""
    from test_penalties import llama_apply, llama_dry, llama_vocab

    dry = dataclasses.replace(GREEDY, dry_multiplier=0.8)
    assert (dry.dry_base, dry.dry_allowed_length, dry.dry_sequence_breakers) == \
        (1.75, 2, ("\n", ":", '"', "*"))
    with make_engine(smollm2, n_ctx=256) as e:
        prompt = tuple(encode_prompt(e, "Write the word 'yes' fifty times, one per line."))
        plain, penalized = (one_answer(e, Request(prompt, settings, max_tokens=32,
                                                  ignore_eos=True))[0]
                            for settings in (GREEDY, dry))
        seq = e.new_sequence()  # the same decodes again: prompt, then one token at a time
        rows = [np.array(e.advance([seq], [prompt]))]
        rows += [np.array(e.advance([seq], [[t]])) for t in penalized[:-1]]
        e.release(seq)
        eog = e.model.eog_tokens
        breakers = e.model.dry_breakers(dry.dry_sequence_breakers)
    assert _first_repeat(plain, 6) is not None, "the greedy answer no longer loops"
    picked = []
    with llama_vocab(smollm2) as vocab:
        sampler = llama_dry(vocab, 0.8, 1.75, 2, 256, list(dry.dry_sequence_breakers))
        try:
            for i, (token, logits) in enumerate(zip(penalized, rows)):
                logits[eog] = -np.inf  # ignore_eos, as the scheduler masks them
                theirs = llama_apply(sampler, logits)
                ours = penalties.penalize(logits, penalized[:i], dry, breakers)
                np.testing.assert_array_equal(ours, theirs, err_msg=f"step {i}")
                picked.append(int(np.argmax(theirs)))
                llama_cpp.llama_sampler_accept(sampler, token)
        finally:
            llama_cpp.llama_sampler_free(sampler)
    assert picked == penalized
    part = next(i for i, (a, b) in enumerate(zip(plain, penalized)) if a != b)
    moved = [i for i, logits in enumerate(rows) if np.argmax(logits) != picked[i]]
    assert part == moved[0] and plain[part] == np.argmax(rows[part])


def test_a_batch_of_different_penalties_equals_each_request_alone(tmp_path, tokenizer):
    """A tied tiny F32 model repeats its last token, so every penalty changes its answers. Rows
    with no penalty, presence and frequency, and DRY at two settings (greedy and sampled) share
    every step, in exact mode; each answer equals the request decoded alone, token for token,
    and differs from the same request without its penalties."""
    base = tmp_path / "tied.gguf"
    write_tiny_model(base, TinySpec(seed=0, tied=True), tokenizer)
    hot = SamplingSettings(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0)
    settings = [GREEDY, dataclasses.replace(GREEDY, presence_penalty=1.5, frequency_penalty=0.5),
                dataclasses.replace(GREEDY, dry_multiplier=0.8),
                dataclasses.replace(GREEDY, dry_multiplier=3.0, dry_base=1.3,
                                    dry_allowed_length=3, dry_sequence_breakers=(".", " the")),
                dataclasses.replace(hot, dry_multiplier=0.8),
                dataclasses.replace(hot, presence_penalty=0.5, dry_multiplier=2.0)]
    with make_engine(base, n_seq_max=8, n_ctx=128) as e:
        requests = [Request(ids(e, text), s, max_tokens=24, seed=seed)
                    for text, s, seed in zip(TEXTS, settings, range(1, 7))]
        scheduler = Scheduler(e)
        handles = [scheduler.submit(r) for r in requests]
        got = answers(scheduler, handles)
        scheduler.close()
    with make_engine(base, n_ctx=128) as e:
        for h, r in zip(handles, requests):
            assert got[(h, 0)][0] == one_answer(e, r)[0], r.sampling.penalties()
            if r.sampling.penalized:
                off = dataclasses.replace(r.sampling, presence_penalty=0.0,
                                          frequency_penalty=0.0, dry_multiplier=0.0)
                assert one_answer(e, dataclasses.replace(r, sampling=off))[0] != got[(h, 0)][0]
