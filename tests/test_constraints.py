"""Constrained decoding inside the guided batch, on real models.

Every answer is checked by references no one here wrote: the `jsonschema` library for JSON
Schemas, Python's `re` for regular expressions, and GBNF files from llama.cpp's own grammars
folder (tests/data/grammars). Exactness: on F32 weights in exact mode a constrained request in
a mixed batch equals the same request alone, and speculative drafts give the greedy tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import edge_genarm
from conftest import answers, make_engine
from edge_genarm import constraints
from edge_genarm.cli import main as cli_main
from edge_genarm.errors import UserError
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler

GRAMMARS = Path(__file__).parent / "data" / "grammars"
GREEDY = SamplingSettings(greedy=True)
WARM = SamplingSettings(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "person": PERSON,
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["person", "address"], "additionalProperties": False},
    "bounded_array": {"type": "object", "properties": {
        "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                    "minItems": 2, "maxItems": 3}},
        "required": ["colours"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                            {"type": "boolean"}]}},
        "required": ["value"], "additionalProperties": False},
    "ref": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"},
                                         "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False},
    "formats": {"type": "object", "properties": {
        "email": {"type": "string", "format": "email", "maxLength": 30},
        "day": {"type": "string", "format": "date"},
        "note": {"type": "string", "maxLength": 12}},
        "required": ["email", "day"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 20}, "done": {"type": "boolean"},
        "priority": {"enum": [1, 2, 3]}},
        "required": ["title"], "additionalProperties": False},
}
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def model():
    with edge_genarm.load(base="@smollm2", parallel=4, speculative="lookup", draft_tokens=4,
                          max_tokens=120) as m:
        yield m


def valid(schema: dict, text: str) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=FORMATS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_answers_validate_against_their_schema_greedy_sampled_n_and_drafted(model, name):
    """Greedy, sampled (n = 3, each answer its own), and with prompt-lookup drafts: every
    answer is JSON that the jsonschema library accepts, and it ends where the JSON does."""
    schema = SCHEMAS[name]
    prompt = f"Give an example of a {name.replace('_', ' ')} record as JSON."
    results = [model.generate(prompt, json_schema=schema, temperature=0, speculative="off"),
               model.generate(prompt, json_schema=schema, temperature=0),
               *next(model.as_completed([prompt], json_schema=schema, n=3, seed=7,
                                        temperature=0.9, speculative="off")).results]
    for result in results:
        assert result.usage.finish_reason == "stop", result.text
        valid(schema, result.text)
    assert results[0].tokens == results[1].tokens  # drafts keep the greedy answer
    assert len({r.text for r in results[2:]}) > 1


def test_a_regex_and_llama_cpps_own_gbnf_grammars_hold(model):
    pattern = r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}"
    for seed in range(3):
        text = model.generate("Name a month and a year.", regex=pattern, seed=seed).text
        assert re.fullmatch(pattern, text), text
    listing = (GRAMMARS / "list.gbnf").read_text()
    item = r"- [^\r\n\x0b\x0c\x85\u2028\u2029]+\n"
    text = model.generate("List three fruits.", grammar=listing, max_tokens=40, seed=1).text
    assert re.fullmatch(f"({item})+", text) or re.fullmatch(f"({item})*- [^\n]+", text), text
    array = (GRAMMARS / "json_arr.gbnf").read_text()
    result = model.generate("Three numbers as a JSON array.", grammar=array, seed=2)
    assert result.usage.finish_reason == "stop"
    assert isinstance(json.loads(result.text), list)
    choice = model.generate("Is the sky blue? Answer yes or no.", choice=["yes", "no"])
    assert choice.text in ("yes", "no") and choice.usage.finish_reason == "stop"


def test_logit_bias_bans_and_forces_tokens(model):
    prompt = model.engine.model.tokenize("The capital of France is", True)
    plain = model.generate(prompt, temperature=0, max_tokens=3, speculative="off")
    first = plain.tokens[0]
    banned = model.generate(prompt, temperature=0, max_tokens=3, speculative="off",
                            logit_bias={str(first): -100})
    assert banned.tokens[0] != first
    forced = model.generate(prompt, temperature=0, max_tokens=3, speculative="off",
                            logit_bias={"28": 100})
    assert forced.tokens == [28, 28, 28]


def test_bad_constraints_are_refused_at_submit_naming_the_option(model):
    cases = [({"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema",
              "uniqueItems"),
             ({"json_schema": {"type": "strin"}}, "json_schema", "strin"),
             ({"json_schema": {"$ref": "#/$defs/missing"}}, "json_schema", "missing"),
             ({"json_schema": _deep(40)}, "json_schema", "deep"),
             ({"grammar": 'root ::= root "a"'}, "grammar", "no text"),
             ({"grammar": "root ::= item\nitem ::= (("}, "grammar", ""),
             ({"regex": "a("}, "regex", "unclosed"),
             ({"regex": "a", "choice": ["b"]}, "choice", "give one"),
             ({"grammar_trigger": "<x>"}, "grammar_trigger", "json_schema"),
             ({"logit_bias": {"999999": 1}}, "logit_bias", "no such token"),
             ({"logit_bias": {"1": 101}}, "logit_bias", "100")]
    for options, param, words in cases:
        with pytest.raises(UserError) as err:
            model.generate("hi", **options)
        assert err.value.param == param and words in str(err.value), (options, str(err.value))
        assert "\n" not in str(err.value)
    assert model.generate("hi", max_tokens=4).usage.completion_tokens > 0  # still serving


def _deep(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_the_cli_takes_a_schema_file_and_refuses_a_bad_one_in_one_line(tmp_path, capsys):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    code = cli_main(["generate", "Describe a person as JSON.", "--json-schema", str(schema),
                     "-t", "0", "--base", "@smollm2"], standalone_mode=False)
    assert code in (0, None)
    valid(PERSON, capsys.readouterr().out.strip())
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "array", "uniqueItems": true}')
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "x", "--json-schema", str(bad), "--base", "@smollm2"])
    assert exit_.value.code == 1  # a bad value, as every option's (2 is for syntax)
    err = capsys.readouterr().err.strip()
    assert "uniqueItems" in err and len(err.splitlines()) == 1 and "Traceback" not in err


# -- exactness on tiny F32 models --------------------------------------------------------------

MIX = [("Hello world", {}, 0.0, {"json_schema": {"type": "object"}}),
       ("The weather today is", {"lora": 0.5}, 0.7, {}),
       ("Once upon a time", {"lora": 1.0}, 1.0, {"regex": "[a-z ]{3,30}"}),
       ("Numbers: 1 2 3", {"arm": 2.0}, 0.0, {"choice": ("alpha", "beta", "gamma")}),
       ("Dear friend,", {"lora": -1.0, "arm": 0.5}, 1.1, {"logit_bias": {"28": 5.0}}),
       ("A quick brown fox", {"lora": 0.5}, 0.9,
        {"grammar": 'root ::= "[" [0-9]+ ("," [0-9]+)* "]"'})]


def _requests(engine) -> list[Request]:
    def ids(text):
        return tuple(engine.model.tokenize(text, add_special=True))
    return [Request(ids(text), SamplingSettings(temperature=t, top_k=0, top_p=1.0, min_p=0.0)
                    if t else GREEDY, max_tokens=24, seed=i, arms=arms, **extra)
            for i, (text, arms, t, extra) in enumerate(MIX)]


def test_a_mixed_batch_of_constrained_and_free_rows_equals_each_request_alone(tiny):
    """Constrained and unconstrained rows, different ARM weights and samplers in one batch:
    each request's tokens equal the request run alone, token for token (F32, exact)."""
    arms = [(tiny.lora, 0.0), (tiny.arm, 0.0)]
    with make_engine(tiny.base, arms, n_seq_max=8, n_ctx=128) as engine:
        requests = _requests(engine)
        with Scheduler(engine) as s:
            handles = [s.submit(r) for r in requests]
            together = answers(s, handles)
        for h, r in zip(handles, requests):
            with Scheduler(engine, share_prefixes=False) as s:
                one = s.submit(r)
                alone = answers(s, [one])[(one, 0)][0]
            assert together[(h, 0)][0] == alone, r
        text = engine.model.token_bytes
        choice = b"".join(text(t) for t in together[(handles[3], 0)][0]).decode()
        assert choice in ("alpha", "beta", "gamma")
        bracket = b"".join(text(t) for t in together[(handles[5], 0)][0]).decode()
        assert re.fullmatch(r"\[[0-9]+(,[0-9]+)*\]?", bracket) or \
            re.fullmatch(r"\[[0-9]+(,[0-9]+)*,?", bracket), bracket


def test_model_drafts_keep_the_grammar_and_the_greedy_tokens(tiny):
    """A model drafter's rows are masked like the target's, rejected positions roll the
    matcher back: greedy answers with drafts equal those without, for every drafter."""
    from test_speculative import load
    with load(tiny, draft=4, draft_model=tiny.merged, arm=tiny.merged) as engine:
        prompt = tuple(engine.model.tokenize("Numbers: 1 2 3", add_special=True))
        base = dict(max_tokens=24, seed=1, regex="[0-9]+( [0-9]+)*")
        plain = Request(prompt, GREEDY, **base)
        with Scheduler(engine) as s:
            h = s.submit(plain)
            want = answers(s, [h])[(h, 0)][0]
        for drafter in ("lookup", "model", "guided", "arm"):
            with Scheduler(engine) as s:
                h = s.submit(Request(prompt, GREEDY, speculative=drafter, **base))
                got, usage = answers(s, [h])[(h, 0)]
            assert got == want, drafter
            if drafter != "lookup":
                assert usage.drafted_tokens > 0, drafter


def test_a_trigger_leaves_the_answer_free_until_it_is_written(smollm2):
    """grammar_trigger: no mask before the trigger's tokens, the grammar's after them."""
    with make_engine(smollm2, exact=False) as engine:
        request = Request((1,), json_schema={"type": "object"}, grammar_trigger="<tool>")
        grammar = constraints.compile_request(request, engine.model)
        state = grammar.start()
        row = np.zeros((1, engine.n_vocab), dtype=np.float32)
        assert np.isfinite(constraints.mask(row.copy(), [(state, 0, ())])).all()
        for token in engine.model.tokenize("Let me call <tool>", False):
            assert state.accept(token) is None
        masked = constraints.mask(row.copy(), [(state, 0, ())])[0]
        allowed = np.flatnonzero(np.isfinite(masked))
        assert 0 < allowed.size < 50
        assert all(engine.model.token_bytes(int(t)).lstrip().startswith(b"{") for t in allowed
                   if engine.model.token_bytes(int(t)).strip())
        assert state.accept(engine.model.tokenize("{", False)[0]) is None
        fork = state.copy()
        assert fork.accept(engine.model.tokenize("}", False)[0]) == "stop"
        assert state.accept(engine.model.tokenize("x", False)[0]) == "grammar_error"
        assert state.error


def test_the_python_api_takes_a_pydantic_class_or_openais_shapes_and_parses(model):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int = Field(ge=0, le=50_000_000)

    got = model.generate("Describe Paris as JSON.", response_format=City, temperature=0)
    assert isinstance(got.parsed, City) and got.parsed.name
    closed = City.model_json_schema() | {"additionalProperties": False}  # OpenAI's strict form
    wrapped = {"type": "json_schema", "json_schema": {"name": "city", "schema": closed,
                                                      "strict": True}}
    raw = model.generate("Describe Rome as JSON.", response_format=wrapped, temperature=0)
    assert City.model_validate(raw.parsed) and raw.parsed == json.loads(raw.text)
    any_object = model.generate('Answer {"ok": true} as JSON.', temperature=0,
                                response_format={"type": "json_object"})
    assert any_object.text.startswith("{")
    assert isinstance(any_object.parsed, dict) if any_object.finish_reason == "stop" else \
        any_object.parsed is None
    assert model.generate("hi", max_tokens=3).parsed is None
    with pytest.raises(UserError) as err:
        model.generate("x", response_format=42)
    assert err.value.param == "response_format"


def test_pargs_args_and_best_of_n_draw_only_allowed_tokens(tiny, rm):
    """The reward-model methods score candidates the grammar allows, and each best-of-n sample
    holds to it: on a random tiny base every answer is still in the grammar's language."""
    from test_reward import load as load_with_rm
    words = ("north", "south", "east", "west")
    with load_with_rm(tiny.base, rm["lora"], k=4, n_seq=4) as engine:
        prompt = tuple(engine.model.tokenize("Which way?", add_special=True))
        for method, extra in (("pargs", {"reward_weight": 50.0}), ("args", {}),
                              ("best-of-n", {"samples": 3})):
            for seed in range(2):
                request = Request(prompt, WARM, max_tokens=12, seed=seed, method=method,
                                  choice=words, **extra)
                with Scheduler(engine) as s:
                    h = s.submit(request)
                    tokens, usage = answers(s, [h])[(h, 0)]
                text = b"".join(engine.model.token_bytes(t) for t in tokens).decode()
                assert text in words and usage.finish_reason == "stop", (method, text)


def test_batch_lines_carry_their_own_constraints_and_a_bad_one_fails_alone(tmp_path):
    from click.testing import CliRunner
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"], "additionalProperties": False}
    lines = [{"id": 1, "prompt": "Give a city as JSON.", "json_schema": city},
             {"id": 2, "prompt": "Is water wet?", "choice": ["yes", "no"]},
             {"id": 3, "prompt": "x", "json_schema": {"type": "strin"}}]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    res = CliRunner().invoke(cli_main, ["generate", "--base", "@smollm2", "--input",
                                        str(source), "--output", str(out), "-t", "0"])
    assert res.exit_code == 1 and "1 prompt failed" in res.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    valid(city, records[1]["text"])
    assert records[2]["text"] in ("yes", "no")
    assert "json_schema" in records[3]["error"] and "strin" in records[3]["error"]


def test_sampled_model_drafts_keep_the_masked_guided_distribution(tiny):
    """1,500 answers of 3 tokens (top-3 at T = 1 of the masked guided rows, ARMs on, regex
    [abc]+), each second token drafted from the draft model's masked distribution: the joint
    distribution passes a chi-square test against the exact one, computed here from one-row
    decodes masked by matchers that consumed each prefix."""
    from test_speculative import TOP3, chi_square_rejects, load, run
    prompt, n = (1, 378, 1300, 314, 17), 1500
    with load(tiny, draft=2, draft_model=tiny.merged) as engine:
        grammar = constraints.compile_request(Request(prompt, regex="[abc]+"), engine.model)

        def top3(tokens, state):
            seq = engine.new_sequence()
            row = engine.score(seq, list(tokens))[-1:].copy()
            engine.release(seq)
            row = constraints.mask(row, [(state, 0, ())])[0].astype(np.float64)
            best = np.argsort(-row, kind="stable")[:3]
            p = np.exp(row[best] - row[best].max())
            return dict(zip(best.tolist(), p / p.sum()))

        def after(state, token):
            state = state.copy()
            state.accept(token)
            return state

        probs, s0 = {}, grammar.start()
        for t1, p1 in top3(prompt, s0).items():
            s1 = after(s0, t1)
            for t2, p2 in top3(prompt + (t1,), s1).items():
                for t3, p3 in top3(prompt + (t1, t2), after(s1, t2)).items():
                    probs[(t1, t2, t3)] = p1 * p2 * p3
        requests = [Request(prompt, TOP3, 3, seed=s, speculative="model", regex="[abc]+")
                    for s in range(n)]
        got = run(engine, requests)
        assert sum(u.drafted_tokens for _, u in got) >= n / 2
        rejects, stat, df = chi_square_rejects([tuple(t) for t, _ in got], probs)
        assert not rejects and df >= 5, (stat, df)
