"""Every option is declared once (edge_genarm/config.py): the command line's flags, the server's
body schema, a batch line's keys, the presets' keys, the Python API's keywords and the docs'
tables are generated from the declarations, and a value is checked in one place."""

from __future__ import annotations

import json
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from edge_genarm import fields
from edge_genarm.batch import Malformed, read_items
from edge_genarm.config import ArmRef, Config, LoadConfig, RequestParams
from edge_genarm.errors import UserError
from edge_genarm.fields import option
from edge_genarm.model import Model
from edge_genarm.options import call, configure, from_click, generation_options, option_table
from edge_genarm.registry import PRESET_KEYS, SAMPLING_KEYS
from edge_genarm.sampling import SamplingSettings
from edge_genarm.serve import protocol


@pytest.fixture
def extended():
    """A made-up request option, declared in this one place."""
    @dataclass(frozen=True)
    class Extended(RequestParams):
        shout: int = option(0, "A made-up option: how loud to answer.", low=0, high=3,
                            env="EDGE_GENARM_SHOUT")
    return Extended


def command(classes):
    return generation_options(click.Command("x", callback=lambda **kw: kw), classes=classes)


def config_of(cmd, args, classes):
    ctx = cmd.make_context("x", args)
    with ctx:
        params = dict(ctx.params)
        return from_click(params, preset=params.pop("preset"), classes=classes)


def test_a_made_up_option_declared_once_is_on_every_interface(extended, demo_base, tmp_path,
                                                              monkeypatch):
    classes = (LoadConfig, extended)
    cmd = command(classes)
    # the command line: a flag with its help, environment variable and range check
    help_text = CliRunner().invoke(cmd, ["--help"], terminal_width=200).output
    assert "--shout INTEGER" in help_text and "how loud to answer" in help_text
    assert "[env EDGE_GENARM_SHOUT]" in help_text
    assert config_of(cmd, ["--base", str(demo_base), "--shout", "2"], classes).request.shout == 2
    monkeypatch.setenv("EDGE_GENARM_SHOUT", "1")
    assert config_of(cmd, ["--base", str(demo_base)], classes).request.shout == 1
    with pytest.raises(UserError, match=r"^--shout must be between 0 and 3, got 9$"):
        config_of(cmd, ["--base", str(demo_base), "--shout", "9"], classes)

    # the server: a field of the body schema, typed, handed to the request by its name
    chat, completion = protocol.body_models(extended)
    assert chat.model_json_schema()["properties"]["shout"]["anyOf"][0]["type"] == "integer"
    assert "shout" in completion.model_json_schema()["properties"]
    body = chat.model_validate_json(json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                "shout": 3}))
    assert protocol.call_options(body, extended)["shout"] == 3
    with pytest.raises(ValidationError):
        chat.model_validate_json('{"messages": [{"role": "user", "content": "Hi"}], '
                                 '"shout": "loud"}')
    assert "shout" not in protocol.ChatBody.model_json_schema()["properties"]

    # a batch line: a key of its own, type-checked as it is read
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"prompt": "Hi", "shout": 3}\n{"prompt": "Ho", "shout": "loud"}\n')
    good, bad = read_items(lines, extended)
    assert good.overrides == {"shout": 3}
    assert isinstance(bad, Malformed) and bad.reason == '"shout" must be an integer, not "loud"'

    # the Python API: a keyword of every call over the loaded default, checked at the call
    config = Config(LoadConfig(base=str(demo_base), ctx_size=256, parallel=1),
                    extended(max_tokens=2, shout=1)).validate()
    with Model(config) as model:
        done = next(model.as_completed(["Hi!"], shout=2))
        assert done.error is None and done.request.shout == 2
        assert next(model.as_completed(["Hi!"])).request.shout == 1
        with pytest.raises(UserError, match="shout must be between 0 and 3, got 7") as err:
            model.generate("Hi!", shout=7)
        assert err.value.param == "shout"

    # the docs' table
    assert "| `shout` | `--shout` | an integer, [0, 3] | 0 | A made-up option" in \
        option_table(extended)


def test_the_command_line_and_the_api_build_the_same_config(monkeypatch):
    """One parser: flags (strings) and the API's typed keywords give equal configs."""
    cmd = command((LoadConfig, RequestParams))
    monkeypatch.setenv("EDGE_GENARM_REPACK", "off")
    cli = config_of(cmd, ["--preset", "demo", "-t", "0.3", "--alpha", "concise=1",
                          "--stop", "\\n", "--dry-sequence-breaker", "\\n",
                          "--dry-sequence-breaker", "x", "-n", "12", "--seed", "4"],
                    (LoadConfig, RequestParams))
    api = configure("demo", {"temperature": 0.3, "alphas": {"concise": 1.0}, "stop": "\\n",
                             "dry_sequence_breakers": ["\\n", "x"], "max_tokens": 12,
                             "seed": 4, "repack": "off"})
    assert cli == api
    assert api.request.sampling.dry_sequence_breakers == ("\n", "x")
    assert [(a.name, a.alpha) for a in api.load.named_arms()] == [("positive", 1.0),
                                                                  ("concise", 1.0)]


def test_arms_as_strings_mappings_or_refs_are_one_thing(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b+c.gguf"  # a '+' in an existing file's name
    a.write_bytes(b""), b.write_bytes(b"")
    want = (ArmRef(str(a), 0.5), ArmRef(str(b), 1.0))
    assert fields.build(LoadConfig, {"arms": [f"{a}:0.5", str(b)]}).arms == want
    assert fields.build(LoadConfig, {"arms": {str(a): 0.5, str(b): 1}}).arms == want
    assert fields.build(LoadConfig, {"arms": f"{a}:0.5 {b}"}).arms == want  # the env's form
    assert fields.build(LoadConfig, {"arms": want}).arms == want
    lora = fields.build(LoadConfig, {"arms": ["@qwen-coder-0.5b+@coder-arm:2"]}).arms[0]
    assert (lora.model, lora.adapter, lora.alpha, lora.label) == \
        ("@qwen-coder-0.5b", "@coder-arm", 2.0, "coder-arm")
    with pytest.raises(UserError, match="the weight 'hot' is not a number"):
        fields.build(LoadConfig, {"arms": ["x.gguf:hot"]})


@pytest.mark.parametrize("values, param, message", [
    ({"ctx_size": 8}, "ctx_size", "ctx_size must be at least 16 tokens, got 8"),
    ({"kv_size": 100}, "kv_size", "kv_size must be 0"),
    ({"threads": 0}, "threads", "threads must be between 1 and 512, got 0"),
    ({"repack": "maybe"}, "repack", "repack must be one of auto, on, off"),
    ({"alphas": {"nobody": 1.0}}, "alphas", "no ARM named 'nobody'"),
    ({"temperature": float("nan")}, "temperature", "temperature must be a finite number"),
    ({"top_p": 0.0}, "top_p", "top_p must be in (0, 1] (1 turns it off), got 0"),
    ({"seed": -1}, "seed", "seed must be between 0 and"),
    ({"max_tokens": "many"}, "max_tokens", 'max_tokens must be an integer, not "many"'),
    ({"method": "pargs", "n": 2}, "method", "needs a reward model"),
    ({"speculative": "lookup", "method": "best-of-n", "reward_model": "@demo-rm"},
     "speculative", "speculative decoding verifies GenARM's guided target"),
    ({"draft_tokens": 40}, "draft_tokens", "draft_tokens must be between 1 and 32, got 40"),
    ({"colour": "red"}, "colour", "unknown option 'colour'"),
])
def test_a_bad_value_is_one_line_naming_its_option(values, param, message):
    with pytest.raises(UserError) as err:
        configure(None, values)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.param == param


def test_presets_take_every_declared_option_by_name():
    request = {s.name for s in fields.specs(RequestParams) if s.group is None}
    assert request <= set(PRESET_KEYS)
    assert set(SAMPLING_KEYS) == {s.name for s in fields.specs(SamplingSettings)}


def test_a_default_drafter_is_off_for_a_method_that_does_not_draft():
    """The coder preset drafts by prompt lookup; a search on it decodes without drafts, while
    a drafter the caller names with such a method is refused, in one place for every path."""
    defaults = configure("qwen-coder-1.5b", {}).request
    assert defaults.speculative == "lookup"
    assert configure("qwen-coder-1.5b", {"method": "search"}).request.speculative == "off"
    with pytest.raises(UserError, match="speculative decoding verifies GenARM's guided target"):
        configure("qwen-coder-1.5b", {"method": "search", "speculative": "lookup"})
    assert call(defaults, [1, 2], {"method": "search"}).speculative == "off"
    assert call(defaults, [1, 2], {}).speculative == "lookup"
    assert call(defaults, [1, 2], {"method": "search", "speculative": "lookup"}).drafts


def test_a_default_fluency_weight_is_off_for_a_score_without_the_bases_log_probs():
    """A load's search_fluency (for its arm-base searches) yields to a request that ranks by
    guided; named with it by the caller, it is refused in one line."""
    defaults = configure("demo", {"method": "search", "search_fluency": 0.5}).request
    assert (defaults.search_score, defaults.search_fluency) == ("arm-base", 0.5)
    assert call(defaults, [1, 2], {}).search_fluency == 0.5
    assert call(defaults, [1, 2], {"search_score": "guided"}).search_fluency == 0.0
    assert call(defaults, [1, 2], {"search_score": "arm"}).search_fluency == 0.5
    with pytest.raises(UserError, match="search_score guided has none to weigh") as err:
        configure("demo", {"search_fluency": 0.5, "search_score": "guided"})
    assert err.value.param == "search_fluency" and "\n" not in str(err.value)
