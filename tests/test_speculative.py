"""Exact speculative decoding: drafts verified in one decode give what decoding without them
gives: the same tokens greedy (F32 weights in exact mode, where a verify's batched rows equal
one-row decodes), the same distribution sampled (a chi-square test on a tiny model, which also
rejects a wrong acceptance rule, so it can fail)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import edge_genarm
from conftest import answers
from edge_genarm import speculative
from edge_genarm.cli import main
from edge_genarm.engine import ArmSpec, Engine, EngineConfig, RewardSpec
from edge_genarm.errors import IncompatibleModelsError, ModelFileError, UserError
from edge_genarm.llama import ContextSettings, quantize_model
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler
from edge_genarm.speculative import Drafting, LookupDrafter
from test_serve import running_server

GREEDY = SamplingSettings(greedy=True)
NEAR_TIE = 1.0  # logits apart at the first difference of 8-bit batched and one-row decodes
TOP3 = SamplingSettings(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)


def load(tiny, draft: int, n_seq: int = 8, alphas=(1.0, 0.5), draft_model=None,
         arm=None) -> Engine:
    """The tiny base with a LoRA ARM and a full-model ARM ("arm": tiny.arm unless given), room
    for `draft` tokens."""
    settings = ContextSettings(n_ctx=160, n_seq_max=n_seq, exact=True, n_logits=draft + 1)
    arms = [ArmSpec(tiny.lora, alphas[0], "lora"), ArmSpec(arm or tiny.arm, alphas[1], "arm")]
    return Engine.load(EngineConfig(Path(tiny.base), arms, settings, draft=draft_model))


def run(engine, requests, drafters=None) -> list[tuple[list[int], object]]:
    """Each request's tokens and usage, all in one scheduler; `drafters` replaces the policy's
    drafter of request i (a deliberately bad one)."""
    with Scheduler(engine, share_prefixes=False) as s:
        handles = [s.submit(r) for r in requests]
        for i, drafter in (drafters or {}).items():
            handles[i].policy.drafter = drafter
        got = answers(s, handles)
    return [got[(h, j)] for h in handles for j in range(h.request.n)]


class RandomDrafter:
    """A bad drafter: tokens drawn uniformly from `pool`, whatever the context."""

    def __init__(self, pool, seed: int):
        self.pool, self.rng = np.asarray(pool), np.random.default_rng(seed)

    def draft(self, tokens, k):
        return [int(t) for t in self.rng.choice(self.pool, size=k)]


class Oracle:
    """A drafter that knows the answer (its tokens after the prompt)."""

    def __init__(self, prompt_len: int, answer: list[int]):
        self.prompt_len, self.answer = prompt_len, answer

    def draft(self, tokens, k):
        at = len(tokens) - self.prompt_len
        return list(self.answer[at:at + k])


class CorruptedOracle:
    """A drafter that knows the answer (its tokens after the prompt) and gets every third
    token wrong: verifies that keep some tokens and reject others."""

    def __init__(self, prompt_len: int, answer: list[int]):
        self.prompt_len, self.answer = prompt_len, answer

    def draft(self, tokens, k):
        at = len(tokens) - self.prompt_len
        out = list(self.answer[at:at + k])
        return [t if (at + i) % 3 else (t + 1) % 3000 for i, t in enumerate(out)]


# -- the drafter and its state ------------------------------------------------------------------

def test_lookup_drafts_what_followed_the_latest_match_of_the_longest_ngram():
    d = LookupDrafter(max_ngram=3, min_ngram=1)
    assert d.draft([5, 6, 7, 8, 9, 1, 6, 7], 3) == [8, 9]           # "6 7": at most 2 after it
    assert d.draft([1, 2, 3, 1, 2, 4, 9, 1, 2], 2) == [4, 9]        # the latest "1 2" wins
    assert d.draft([1, 2, 3, 4, 2, 3, 4, 5, 3, 4], 9) == [5, 3]     # "3 4" (no trigram seen)
    assert d.draft([7, 1, 2, 3, 9, 9, 1, 2, 3], 9) == [9, 9, 1]     # the trigram, 3 at most
    assert d.draft([1, 2, 3], 4) == []                               # nothing seen: no draft
    assert d.draft([1, 2, 1], 0) == []
    shipped = LookupDrafter()                                        # 4 tokens must match
    assert shipped.draft([4, 1, 2, 3, 8, 9, 1, 2, 3], 9) == []
    assert shipped.draft([1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4], 9) == [5, 6, 7, 0]


def test_the_draft_length_follows_the_measured_acceptance_and_the_costs():
    """The length with the most tokens per unit of cost: 3 for a new answer on a CPU (drafts
    taken as kept 3 times in 4; a verify of m positions costing m ** 0.5 steps), the limit
    after drafts that were all kept or where a verify costs little more than a step (a GPU),
    1 (the least) after drafts mostly rejected or with a drafter step costing half the
    target's."""
    assert Drafting(limit=16).k == 3
    kept = Drafting(limit=6)
    for _ in range(10):
        kept.verified(4, 4)
    assert kept.k == 6 and (kept.drafted, kept.accepted, kept.missed) == (40, 40, 0)
    rejected = Drafting(limit=6)
    for _ in range(10):
        rejected.verified(3, 0)
    assert rejected.k == 1 and rejected.missed == 10
    assert Drafting(limit=6, exponent=0.1).k == 6
    assert Drafting(limit=6, step_cost=0.5).k == 1
    assert Drafting(limit=16, step_cost=0.1).k == 2


# -- greedy: the same tokens ----------------------------------------------------------------

def test_greedy_speculative_decoding_gives_the_same_tokens_for_each_drafter(tiny):
    """Prompt lookup, a drafter right two times in three, a random one, and a mixed batch
    (n = 2, penalties, rows without drafts): every answer equals the same request decoded
    without speculation, token for token."""
    prompts = [(1, 504, 3458, 504, 3458, 6357, 282), (1, 378, 1300, 314, 378, 1300),
               (1, 17, 9, 3000, 42, 7)]
    with load(tiny, draft=6) as engine:
        plain = [Request(p, GREEDY, 40, arms={"lora": a}) for p, a in zip(prompts, (1, 0, 2))]
        plain.append(Request(prompts[2], SamplingSettings(greedy=True, presence_penalty=0.7),
                             40, n=2))
        spec = [Request(**{**r.__dict__, "speculative": "lookup"}) for r in plain]
        want = run(engine, plain)
        lookup = run(engine, spec)
        oracle = run(engine, spec, {i: CorruptedOracle(len(r.prompt_ids), want[i][0])
                                    for i, r in enumerate(spec)})
        bad = run(engine, spec[:3], {i: RandomDrafter(range(0, 3000, 7), i) for i in range(3)})
        mixed = run(engine, [spec[0], plain[1], spec[2], plain[3], spec[3]],
                    {0: CorruptedOracle(len(spec[0].prompt_ids), want[0][0])})
    tokens = [t for t, _ in want]
    assert [t for t, _ in lookup] == tokens
    assert [t for t, _ in oracle] == tokens
    assert [t for t, _ in bad] == tokens[:3]
    assert [t for t, _ in mixed] == tokens + tokens[3:]  # n = 2: two answers each
    assert [u.finish_reason for _, u in oracle] == [u.finish_reason for _, u in want]
    drafted = sum(u.drafted_tokens for _, u in oracle)
    accepted = sum(u.accepted_tokens for _, u in oracle)
    assert drafted > 40 and 0.3 * drafted < accepted < drafted, (drafted, accepted)
    assert sum(u.drafted_tokens for _, u in bad) > 20
    assert sum(u.accepted_tokens for _, u in mixed) > 10
    assert all(u.drafted_tokens == 0 for _, u in want)


def test_greedy_model_drafters_give_the_same_tokens_in_a_mixed_batch(tiny):
    """The draft model alone (the base with the LoRA ARM merged: near the target, not equal
    to it), the draft model guided by the request's ARMs, and the full-model ARM drafting
    alone (the same merged model as an ARM), each in one batch with a lookup row, a row without drafts and n = 2 with a
    penalty: every answer equals the same request decoded without speculation."""
    prompts = [(1, 504, 3458, 504, 3458, 6357, 282), (1, 378, 1300, 314, 378, 1300),
               (1, 17, 9, 3000, 42, 7)]
    plain = [Request(prompts[0], GREEDY, 40, arms={"lora": 2}),
             Request(prompts[1], GREEDY, 40),
             Request(prompts[2], SamplingSettings(greedy=True, presence_penalty=0.7), 40, n=2),
             Request(prompts[0], GREEDY, 40)]
    with load(tiny, draft=6, draft_model=tiny.merged, arm=tiny.merged) as engine:
        want = run(engine, plain)
        for kind in ("model", "guided", "arm"):
            spec = [Request(**{**r.__dict__, "speculative": kind}) for r in plain[:3]]
            got = run(engine, spec + [replace(plain[3], speculative="lookup")])
            assert [t for t, _ in got] == [t for t, _ in want], kind
            assert [u.finish_reason for _, u in got] == [u.finish_reason for _, u in want]
            used = [u for _, u in got[:4]]
            assert all(u.drafted_tokens > 20 for u in used), (kind, used)
            assert sum(u.accepted_tokens for u in used) > 0, kind


def test_a_guided_drafter_decodes_each_arm_token_once(tiny):
    """The base itself as the draft model, guided by the request's ARMs: its rows are the
    target's, so every draft token is kept, and the ARM rows computed while drafting serve the
    verify: each ARM context decodes every token of the prompt and answer once (the last
    answer token, never fed, aside)."""
    prompt = (1, 378, 1300, 314, 17)
    with load(tiny, draft=6, draft_model=tiny.base) as engine:
        want = run(engine, [Request(prompt, GREEDY, 40)])[0][0]
        fed = {}
        for arm in engine.arms:
            decode = arm.context.decode

            def counting(entries, decode=decode, name=arm.name):
                fed[name] = fed.get(name, 0) + sum(len(e[1]) for e in entries)
                return decode(entries)
            arm.context.decode = counting
        (tokens, usage), = run(engine, [Request(prompt, GREEDY, 40, speculative="guided")])
    assert tokens == want
    assert usage.accepted_tokens == usage.drafted_tokens >= 15
    assert fed == {"lora": len(prompt) + 39, "arm": len(prompt) + 39}


def test_drafts_end_where_a_stop_string_the_token_limit_or_the_context_ends(tiny):
    """A stop string inside a kept draft, max_tokens inside a draft, and a context that fills:
    the same text, tokens and finish reason as without drafts, with a drafter that knows the
    answer (every draft token kept)."""
    prompt = (1, 378, 1300, 314, 17)
    with load(tiny, draft=6) as engine:
        full = run(engine, [Request(prompt, GREEDY, 500)])[0][0]  # to the context's end
        stop = b"".join(engine.model.token_bytes(t) for t in full[20:23]).decode(
            "utf-8", errors="replace")  # text deep inside a draft
        cases = [Request(prompt, GREEDY, 60, stop=(stop,)), Request(prompt, GREEDY, 17),
                 Request(prompt, GREEDY, 500)]
        plain = run(engine, cases)
        spec = [Request(**{**r.__dict__, "speculative": "lookup"}) for r in cases]
        got = run(engine, spec, {i: Oracle(len(prompt), full) for i in range(3)})
    assert [t for t, _ in got] == [t for t, _ in plain]
    assert [u.finish_reason for _, u in got] == [u.finish_reason for _, u in plain] == \
        ["stop_string", "length", "context_full"]
    assert got[0][1].accepted_tokens > 5


# -- sampling: the same distribution --------------------------------------------------------

def exact_distribution(engine, prompt) -> dict[tuple[int, int, int], float]:
    """P(t1, t2, t3) under top-3 sampling at T = 1 of the guided rows, from one-row decodes,
    written out again here (top 3 of the row, softmax)."""
    def top3(row):
        best = np.argsort(-row.astype(np.float64), kind="stable")[:3]
        p = np.exp(row[best].astype(np.float64) - row[best].max())
        return dict(zip(best.tolist(), p / p.sum()))

    def rows(tokens):
        seq = engine.new_sequence()
        try:
            return engine.score(seq, list(tokens))
        finally:
            engine.release(seq)

    out = {}
    for t1, p1 in top3(rows(prompt)[-1]).items():
        for t2, p2 in top3(rows(prompt + (t1,))[-1]).items():
            for t3, p3 in top3(rows(prompt + (t1, t2))[-1]).items():
                out[(t1, t2, t3)] = p1 * p2 * p3
    return out


def chi_square_rejects(samples, probs, alpha_z=3.09) -> tuple[bool, float, int]:
    """Pearson's test at significance 0.001 (z = 3.09), cells of expected count under 5 pooled;
    a sample outside the support rejects at once. The critical value is Wilson and
    Hilferty's approximation of the chi-square quantile."""
    n = len(samples)
    counts: dict = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    if any(s not in probs for s in counts):
        return True, math.inf, 0
    big = [c for c in probs if n * probs[c] >= 5]
    small = [c for c in probs if n * probs[c] < 5]
    observed = [counts.get(c, 0) for c in big] + ([sum(counts.get(c, 0) for c in small)]
                                                  if small else [])
    expected = [n * probs[c] for c in big] + ([n * sum(probs[c] for c in small)]
                                              if small else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    critical = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat > critical, stat, df


class LikelyDrafter:
    """Drafts the second token as the one the target most likely draws after the first, so
    that verifies both keep and reject draft tokens of real probability (a drafter that chose
    uniformly among the three would hide a rule that redraws from p: its errors cancel)."""

    def __init__(self, probs: dict):
        after: dict[int, dict[int, float]] = {}
        for (t1, t2, _), p in probs.items():
            after.setdefault(t1, {})[t2] = after.get(t1, {}).get(t2, 0.0) + p
        self.best = {t1: max(p, key=p.get) for t1, p in after.items()}

    def draft(self, tokens, k):
        return [self.best[tokens[-1]]] if k else []


def sample(engine, prompt, n, probs, drafter) -> tuple[list[tuple[int, ...]], int]:
    """n answers of 3 tokens, seeds 0..n-1, each drafting its second token."""
    requests = [Request(prompt, TOP3, 3, seed=s, speculative=drafter) for s in range(n)]
    likely = LikelyDrafter(probs)
    answers = run(engine, requests, {i: likely for i in range(n)} if drafter == "lookup"
                  else None)
    assert all(len(t) == 3 for t, _ in answers)
    assert all(u.drafted_tokens == 1 for _, u in answers)
    return [tuple(t) for t, _ in answers], sum(u.accepted_tokens for _, u in answers)


def redraw_from_p(x, target, row, tokens, rng, q=None):
    """A wrong rule: keeps x with probability min(1, p(x) / q(x)), but redraws from p itself
    instead of max(0, p - q) (for a certain drafter: p without x), which makes x too likely."""
    ids, p = target.distribution(row, tokens)
    at = np.flatnonzero(ids == x)
    q_x = 1.0 if q is None else float(q[1][np.flatnonzero(q[0] == x)[0]])
    if at.size and rng.random() * q_x < p[at[0]]:
        return x, True
    return target.next_token(row, tokens, rng), False


def keep_all(x, target, row, tokens, rng, q=None):
    """A wrong rule: every draft token kept."""
    return x, True


@pytest.mark.parametrize("drafter", ["lookup", "model"])
def test_sampled_speculation_matches_the_guided_distribution_and_wrong_rules_fail(
        tiny, monkeypatch, drafter):
    """2,000 answers of 3 tokens (top-3 at T = 1, ARMs on), each second token drafted: by a
    certain drafter, as the token the target most likely draws there (lookup's rule), or
    drawn from a draft model's own distribution q (the base with the LoRA ARM merged, without
    the other ARM: its top 3 part from the target's). The joint distribution of the three tokens passes a chi-square test
    against the exact one; two wrong acceptance rules (keep every draft token; redraw from p
    instead of max(0, p - q)) fail the same test."""
    prompt, n = (1, 378, 1300, 314, 17), 2000
    with load(tiny, draft=2, draft_model=tiny.merged) as engine:
        probs = exact_distribution(engine, prompt)
        samples, accepted = sample(engine, prompt, n, probs, drafter)
        rejects, stat, df = chi_square_rejects(samples, probs)
        assert not rejects and df >= 10, (stat, df)
        assert 0.1 * n < accepted < 0.9 * n  # both ways of the rule were taken
        for wrong_rule in (keep_all, redraw_from_p):
            monkeypatch.setattr(speculative, "accept", wrong_rule)
            wrong, _ = sample(engine, prompt, n, probs, drafter)
            assert chi_square_rejects(wrong, probs)[0], wrong_rule


# -- the options -----------------------------------------------------------------------------

def test_refusals_name_the_option(tiny):
    with load(tiny, draft=2) as engine, Scheduler(engine) as s:
        with pytest.raises(UserError, match="draft_tokens must be between 1 and 2") as info:
            s.submit(Request((1, 2, 3), speculative="lookup", draft_tokens=3))
        assert info.value.param == "draft_tokens"
        with pytest.raises(UserError, match="speculative must be one of off, lookup, model, guided, arm, got 'ngram'"):
            s.submit(Request((1, 2, 3), speculative="ngram"))
        for kind in ("model", "guided"):
            with pytest.raises(UserError, match=f"the {kind} drafter needs a draft model: "
                               "load one with --draft-model") as info:
                s.submit(Request((1, 2, 3), speculative=kind))
            assert info.value.param == "speculative"
        with pytest.raises(UserError, match="the arm drafter needs an ARM that is a model of its "
                           "own .* switched on"):
            s.submit(Request((1, 2, 3), speculative="arm", arms={"arm": 0}))
        s.submit(Request((1, 2, 3), speculative="arm", arms={"lora": 0}))
    with load(tiny, draft=0) as engine, Scheduler(engine) as s:
        with pytest.raises(UserError, match="loaded without room for drafts"):
            s.submit(Request((1, 2, 3), speculative="lookup"))
    with pytest.raises(IncompatibleModelsError, match="a draft model must share the base's "
                       "tokenizer"):
        load(tiny, draft=2, draft_model=tiny.renamed)
    with pytest.raises(ModelFileError, match="is a LoRA adapter; a draft model is a full model"):
        load(tiny, draft=2, draft_model=tiny.lora)


@pytest.mark.parametrize("drafter", [["lookup"], ["guided", "--draft-model", "@smollm2"]])
def test_the_cli_reports_drafted_and_accepted_tokens_on_the_demo(drafter):
    """Prompt lookup, and the demo's base at 4 bits (the shipped Q4_1 file) drafting for its
    8-bit copy guided by the positive ARM: the same answer as without drafts (up to a kernel
    near-tie) and the drafts counted in the record."""
    args = ["generate", "--preset", "demo", "--greedy", "-n", "48", "--json", "--raw",
            "one two three four five six seven, one two three four five six seven, one two"]
    off = CliRunner().invoke(main, args)
    on = CliRunner().invoke(main, args + ["--speculative", *drafter, "--draft-tokens", "6"])
    assert off.exit_code == 0 and on.exit_code == 0, on.output
    a, b = json.loads(off.stdout), json.loads(on.stdout)
    assert b["speculative"] == drafter[0] and b["accepted_tokens"] > 5
    assert a["drafted_tokens"] == 0 and "speculative" not in a
    # 8-bit weights: a verify's batched rows may part from one-row decodes at a near-tie only
    d = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
    if d is not None:
        with edge_genarm.load("demo") as model:
            seq = model.engine.new_sequence()
            row = model.engine.score(seq, a["prompt_ids"] + a["tokens"][:d])[-1]
        assert abs(float(row[a["tokens"][d]] - row[b["tokens"][d]])) < NEAR_TIE, d
    bad = CliRunner().invoke(main, args + ["--draft-tokens", "0", "--speculative", "lookup"])
    assert bad.exit_code == 1 and "--draft-tokens must be between 1 and 32" in bad.output


def test_the_cli_refuses_a_drafter_the_models_cannot_run_in_one_line():
    args = ["generate", "--preset", "demo", "-n", "4", "hello"]
    for extra, message in [(["--speculative", "arm"], "the arm drafter needs an ARM that is a "
                            "model of its own"),
                           (["--speculative", "model"], "the model drafter needs a draft model"),
                           (["--speculative", "guided", "--draft-model", "@demo-positive"],
                            "is a LoRA adapter; a draft model is a full model")]:
        res = CliRunner().invoke(main, args + extra)
        assert res.exit_code == 1, res.output
        assert message in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_the_server_takes_speculative_as_an_extension_field_and_counts_drafts():
    """A server loaded with --speculative: a request's `speculative` field turns it on or off;
    the usage names kept and rejected draft tokens as OpenAI names predicted outputs' tokens,
    and /metrics counts them."""
    prompt = "one two three four five six seven, one two three four five six seven, one two"
    with running_server("--preset", "demo", "--speculative", "lookup", "--parallel", "2",
                        "--ctx-size", "256", "--draft-model", "@smollm2") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        got = {}
        for mode in ("off", "lookup", "guided"):
            got[mode] = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": prompt}], temperature=0,
                max_tokens=40, extra_body={"speculative": mode})
        details = {m: r.usage.completion_tokens_details for m, r in got.items()}
        assert details["off"].accepted_prediction_tokens == 0
        assert details["off"].rejected_prediction_tokens == 0
        assert details["lookup"].accepted_prediction_tokens > 0
        assert details["guided"].accepted_prediction_tokens > 0
        assert got["lookup"].choices[0].message.content == got["off"].choices[0].message.content
        bad = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "speculative": "lookup",
            "draft_tokens": 99})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "draft_tokens"
        metrics = {s.name: s.value for f in text_string_to_metric_families(
            httpx.get(f"{url}/metrics").text) for s in f.samples if s.labels.get("model") == "demo"}
        assert metrics["edge_genarm_accepted_draft_tokens_total"] == \
            details["lookup"].accepted_prediction_tokens + \
            details["guided"].accepted_prediction_tokens
        assert metrics["edge_genarm_draft_tokens_total"] >= \
            metrics["edge_genarm_accepted_draft_tokens_total"]


def test_a_preset_may_turn_speculation_on_and_an_option_off(tmp_path):
    """speculative and draft_tokens in a preset: its answers draft, the same tokens as
    --speculative lookup given by hand; --speculative off turns it off."""
    f = tmp_path / "spec.toml"
    f.write_text('''[presets.spec]
base = "@smollm2"
speculative = "lookup"
draft_tokens = 4
[presets.spec.sampling]
temperature = 0.0
''')

    def record(*args):
        res = CliRunner().invoke(main, ["generate", "--json", "--models-file", str(f), "-n", "48",
                                        *args, "Count: one two three four five, one two three "
                                        "four five, one two three four five."])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    preset = record("--preset", "spec")
    by_hand = record("--greedy", "--speculative", "lookup", "--draft-tokens", "4")
    off = record("--preset", "spec", "--speculative", "off")
    assert preset["speculative"] == "lookup" and preset["drafted_tokens"] > 0
    assert preset["tokens"] == by_hand["tokens"]
    assert (preset["drafted_tokens"], preset["accepted_tokens"]) == \
        (by_hand["drafted_tokens"], by_hand["accepted_tokens"])
    assert off["drafted_tokens"] == 0 and "speculative" not in off


def test_speculative_rows_share_a_step_with_reward_model_rows(tiny, rm):
    """A drafting GenARM request beside PARGS and best-of-n requests (the reward model scores
    one row per PARGS answer while the drafting row gives several): each answers as alone."""
    settings = ContextSettings(n_ctx=160, n_seq_max=6, exact=True, n_logits=5)
    config = EngineConfig(Path(tiny.base), [ArmSpec(tiny.lora, 1.0, "lora")], settings,
                          reward=RewardSpec(rm["lora"], 4))
    prompt = (1, 378, 1300, 314, 17)
    sampled = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    with Engine.load(config) as engine:
        full = run(engine, [Request(prompt, GREEDY, 30)])[0][0]
        requests = [Request(prompt, GREEDY, 30, speculative="lookup"),
                    Request((1, 504, 3458, 6357), GREEDY, 12, method="pargs", reward_weight=2.0),
                    Request((1, 17, 9, 3000), sampled, 8, seed=4, method="best-of-n", samples=2)]
        alone = [run(engine, [r], {0: Oracle(len(prompt), full)} if i == 0 else None)[0]
                 for i, r in enumerate(requests)]
        together = run(engine, requests, {0: Oracle(len(prompt), full)})
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert together[0][0] == full and together[0][1].accepted_tokens > 10


def test_every_drafter_on_the_demo_in_f32_gives_the_same_greedy_tokens(smollm2, tmp_path):
    """The demo preset on its base dequantized to F32, in exact mode (a verify's batched rows
    equal one-row decodes): prompt lookup, the shipped 4-bit file as draft model, alone and
    guided by the positive ARM, each give the greedy answer without drafts token for token."""
    f32 = tmp_path / "smollm2-f32.gguf"
    quantize_model(smollm2, f32, "F32", requantize=True)
    prompt = "Count: one two three four five six, one two three four five six, one two"
    with edge_genarm.load("demo", base=f32, exact=True, speculative="lookup",
                          draft_model=smollm2, raw=True, parallel=2) as model:
        plain = model.generate(prompt, temperature=0, max_tokens=48, speculative="off")
        for drafter in ("lookup", "model", "guided"):
            got = model.generate(prompt, temperature=0, max_tokens=48, speculative=drafter)
            assert got.tokens == plain.tokens, drafter
            assert got.usage.accepted_tokens > 5, (drafter, got.usage)


def test_every_drafter_on_the_weak_to_strong_pair_gives_the_greedy_answer_up_to_near_ties():
    """The coder preset (the 1.5B guided by the 0.5B's LoRA ARM; the 0.5B as draft model;
    DRY off, so that the argmax is the guided row's): each drafter's greedy answer equals the
    answer without drafts, or parts from it only where the two tokens' guided scores are within
    a kernel near-tie (quantized weights: a verify's batched rows round unlike one-row decodes);
    every drafter's drafts are kept, the model drafters' mostly."""
    prompt = ("Complete this function, keeping its signature and docstring:\n\n"
              "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number, "
              "counting fibonacci(0) == 0 and fibonacci(1) == 1.\"\"\"\n")
    greedy = {"temperature": 0, "max_tokens": 64, "dry_multiplier": 0}
    with edge_genarm.load("qwen-coder-1.5b", speculative="lookup", draft_tokens=8,
                          parallel=2) as model:
        plain = model.generate(prompt, speculative="off", **greedy)
        for drafter in ("lookup", "model", "guided", "arm"):
            got = model.generate(prompt, speculative=drafter, **greedy)
            assert got.usage.accepted_tokens > 0, drafter
            if drafter != "lookup":
                assert got.usage.accepted_tokens > got.usage.drafted_tokens / 2, drafter
            d = next((i for i, (x, y) in enumerate(zip(plain.tokens, got.tokens)) if x != y),
                     None)
            if d is None:
                assert got.tokens == plain.tokens, drafter
                continue
            top = model.generate(plain.prompt_ids + plain.tokens[:d], speculative="off",
                                 logprobs=20, **greedy | {"max_tokens": 1}).logprobs[0].top
            scores = dict(top)
            assert abs(scores[plain.tokens[d]] - scores[got.tokens[d]]) < NEAR_TIE, (drafter, d)


# -- sampling: several draft tokens per verify ------------------------------------------------

def exact_tables(engine, prompt, length) -> tuple[dict, dict]:
    """P(t1, ..., t_length) under top-3 sampling at T = 1 of the guided rows, from one-row
    decodes (as exact_distribution), and each shorter answer's next-token top 3 with their
    probabilities: {answer so far: {token: p}}."""
    def top3(tokens):
        seq = engine.new_sequence()
        try:
            row = engine.score(seq, list(tokens))[-1].astype(np.float64)
        finally:
            engine.release(seq)
        best = np.argsort(-row, kind="stable")[:3]
        p = np.exp(row[best] - row[best].max())
        return dict(zip(best.tolist(), p / p.sum()))

    probs, after = {}, {}

    def walk(answer, p):
        if len(answer) == length:
            probs[answer] = p
            return
        after[answer] = top3(prompt + answer)
        for t, q in after[answer].items():
            walk(answer + (t,), p * q)

    walk((), 1.0)
    return probs, after


class LikelyThenUnlikely:
    """Drafts, from the answer so far, the target's likeliest next token first and then, given
    that draft, the least likely of its top 3: verifies of two draft tokens that keep the
    first and reject the second, keep both, or reject the first."""

    def __init__(self, prompt_len: int, after: dict):
        self.prompt_len, self.after = prompt_len, after

    def draft(self, tokens, k):
        answer, out = tuple(tokens[self.prompt_len:]), []
        for i in range(k):
            p = self.after[answer + tuple(out)]
            out.append((max if i == 0 else min)(p, key=p.get))
        return out


def test_sampled_drafts_of_two_tokens_match_the_guided_distribution_and_wrong_rules_fail(
        tiny, monkeypatch):
    """1,500 answers of 4 tokens (top-3 at T = 1, ARMs on), each verify checking up to two
    draft tokens (the third and fourth tokens verified after a kept or rejected draft before
    them): the joint distribution of the four tokens passes a chi-square test against the
    exact one, and the two wrong acceptance rules (keep every draft token; redraw from p) fail
    it on 500 answers each (fewer answers make a rejection harder, not easier). The counts show the verifies: after the first token each answer drafts two; drafted 2
    and kept 1 is a rejection at the second draft position after a kept first (the token drawn
    there is the third, and the fourth is decoded without a draft)."""
    prompt, n, length = (1, 378, 1300, 314, 17), 1500, 4
    with load(tiny, draft=2) as engine:
        probs, after = exact_tables(engine, prompt, length)
        drafter = LikelyThenUnlikely(len(prompt), after)

        def sample_all(n):
            requests = [Request(prompt, TOP3, length, seed=s, speculative="lookup")
                        for s in range(n)]
            got = run(engine, requests, {i: drafter for i in range(n)})
            assert all(len(t) == length for t, _ in got)
            return ([tuple(t) for t, _ in got],
                    [(u.drafted_tokens, u.accepted_tokens) for _, u in got])

        samples, counts = sample_all(n)
        rejects, stat, df = chi_square_rejects(samples, probs)
        assert not rejects and df >= 20, (stat, df)
        assert all(drafted >= 2 for drafted, _ in counts)
        kept_then_missed = sum(c == (2, 1) for c in counts)
        both_kept = sum(c == (2, 2) for c in counts)
        assert kept_then_missed > 0.3 * n and both_kept > 0.05 * n, (kept_then_missed, both_kept)
        for wrong_rule in (keep_all, redraw_from_p):
            monkeypatch.setattr(speculative, "accept", wrong_rule)
            wrong, _ = sample_all(500)
            assert chi_square_rejects(wrong, probs)[0], wrong_rule
