"""Tool calling without a server: the plans' grammars compile against the real tokenizers
(Qwen2.5-Coder's, whose template writes <tool_call> blocks, and SmolLM2's, which knows no tools)
and hold an answer to the tools' schemas; the chat templates get the tools and the history as
transformers renders them; finished answers and streamed pieces, cut anywhere, read back as the
same calls; bad tools are refused naming the field."""

from __future__ import annotations

import json
import random

import pytest
from llguidance import LLMatcher

from edge_genarm import tools
from edge_genarm.errors import UserError
from edge_genarm.llama import Model
from edge_genarm.registry import resolve_model
from edge_genarm.templates import render_chat, tool_history

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
# a pydantic-style schema: its local references must still resolve inside the grammar
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": {"x": {"$ref": "#/$defs/N"}, "y": {"$ref": "#/$defs/N"}},
        "required": ["x", "y"], "additionalProperties": False,
        "$defs": {"N": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]
CHOICES = ["auto", "required", {"type": "function", "function": {"name": "add"}}]
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ADDING = '{"name": "add", "arguments": {"x": 1, "y": 2}}'


@pytest.fixture(scope="module", params=["@qwen-coder-0.5b", "@smollm2"])
def vocabulary(request):
    """(the tokenizer's Model, its chat template, llguidance's view of it)."""
    model = Model(resolve_model(request.param), vocab_only=True)
    yield model, model.meta("tokenizer.chat_template"), model.grammar_tokenizer
    model.close()


def hermes_answer(calls: list[str]) -> str:
    """What Qwen2.5 writes: blocks one after another."""
    return "\n".join(f"{tools.OPEN}\n{c}\n{tools.CLOSE}" for c in calls)


def accepts(model, tokenizer, grammar: str, text: str, *pieces: str) -> bool:
    """Whether the grammar takes `pieces` (each tokenized alone) then `text`."""
    ids = [t for p in pieces for t in model.tokenize(p, False)] + model.tokenize(text, False)
    matcher = LLMatcher(tokenizer, grammar)
    return matcher.consume_tokens(ids) and matcher.is_accepting()


# -- grammars ----------------------------------------------------------------------------------
def test_the_format_follows_the_template(vocabulary):
    model, template, _ = vocabulary
    expected = tools.HERMES if "qwen" in model.path.name else tools.GENERIC
    assert tools.template_format(template) == expected
    assert tools.template_format(None) == tools.GENERIC


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("choice", CHOICES, ids=["auto", "required", "named"])
def test_each_plan_compiles_and_holds_calls_to_the_schemas(vocabulary, choice, parallel):
    model, template, tokenizer = vocabulary
    plan = tools.plan(TOOLS, choice, parallel, template)
    assert LLMatcher.validate_grammar(plan.grammar, tokenizer) == ""
    if plan.format == tools.HERMES:
        assert plan.template_tools == TOOLS
        two, good = hermes_answer([ADDING, ADDING]), hermes_answer([ADDING])
        bad_args = hermes_answer([ADDING.replace("1", '"one"')])
        wrong_name = hermes_answer([ADDING.replace('"add"', '"sub"')])
        # the block must be the <tool_call> token itself, not the same text in pieces
        assert not accepts(model, tokenizer, plan.grammar, good[len(tools.OPEN):], "<tool",
                           "_call>")
        # "auto" may answer in text, call after text, or write a call bare; text may not
        # begin with "{", which begins a call
        auto = choice == "auto"
        assert accepts(model, tokenizer, plan.grammar, "It is {sunny}.") == auto
        assert accepts(model, tokenizer, plan.grammar, "Let me see.\n\n" + good) == auto
        assert accepts(model, tokenizer, plan.grammar, ADDING) == auto
        assert accepts(model, tokenizer, plan.grammar, f"{ADDING}\n{ADDING}") == (
            auto and parallel)
        for fence in tools.FENCES:  # json, python (a code-only system message) or none
            assert accepts(model, tokenizer, plan.grammar, f"{fence}{ADDING}\n```") == auto
            pretty = json.dumps(json.loads(ADDING), indent=4)
            assert accepts(model, tokenizer, plan.grammar, f"{fence}{pretty}\n```") == auto
            assert not accepts(model, tokenizer, plan.grammar, fence + '{"sunny": 1}\n```')
        assert not accepts(model, tokenizer, plan.grammar, '{"sunny": true}')
        for text in ("```python\nprint(1)\n```", f"{tools.FENCES[0]}[1, 2]\n```", "`x`",
                     "```py\n{1}"):
            assert accepts(model, tokenizer, plan.grammar, text) == auto
    else:
        assert plan.template_tools is None
        wrap = '{{"tool_calls": [{}]}}'.format
        two, good = wrap(f"{ADDING}, {ADDING}"), wrap(ADDING)
        bad_args, wrong_name = wrap(ADDING.replace("1", '"one"')), wrap(ADDING.replace(
            '"add"', '"sub"'))
        # "auto" may answer instead; the others must call
        reply = accepts(model, tokenizer, plan.grammar, '{"response": "Hello."}')
        assert reply == (choice == "auto")
    assert accepts(model, tokenizer, plan.grammar, good)
    assert accepts(model, tokenizer, plan.grammar, two) == parallel
    assert not accepts(model, tokenizer, plan.grammar, bad_args)
    assert not accepts(model, tokenizer, plan.grammar, wrong_name)
    weather = good.replace(ADDING, PARIS)
    assert accepts(model, tokenizer, plan.grammar, weather) == (choice != CHOICES[2])


def test_none_and_no_tools_plan_nothing():
    assert tools.plan(TOOLS, "none") is None
    assert tools.plan(None) is None and tools.plan([]) is None
    assert tools.plan(None, "auto") is None and tools.plan(None, "none") is None


# -- templates ---------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris, and 1 + 2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add",
                                                          "arguments": '{"x": 1, "y": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "3"}]


def test_hermes_templates_render_tools_and_history_as_transformers_does(vocabulary):
    from transformers.utils.chat_template_utils import render_jinja_template

    model, template, _ = vocabulary
    fmt = tools.template_format(template)
    messages = tool_history(CONVERSATION, fmt == tools.HERMES)
    plan = tools.plan(TOOLS, "auto", True, template)
    messages = plan.instruct(messages)
    ours = render_chat(template, messages, tools=plan.template_tools)
    theirs = render_jinja_template(conversations=[messages], tools=plan.template_tools,
                                   chat_template=template, add_generation_prompt=True)[0][0]
    assert ours == theirs
    if fmt == tools.HERMES:  # the template lists the tools and writes the calls' arguments
        assert json.dumps(WEATHER) in ours
        assert f'{tools.OPEN}\n{PARIS}\n{tools.CLOSE}' in ours
        assert "<tool_response>\n22 C and sunny\n</tool_response>" in ours
    else:  # told in a system message; calls and results as JSON text in ordinary turns
        assert ours.count("<|im_start|>system") == 1
        assert '"name": "get_weather", "description": "The weather in a city now."' in ours
        assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
            '{"name": "add", "arguments": {"x": 1, "y": 2}}]}' in ours
        assert '{"tool_response": {"name": "add", "content": "3"}}' in ours
        assert "<|im_start|>tool" not in ours


# -- reading answers ---------------------------------------------------------------------------
ANSWERS = [
    (tools.HERMES, "Let me look that up.\n\n" + hermes_answer([
        '{"name": "get_weather", "arguments": {"city": "S\\u00e3o \\"Paulo\\"", '
        '"days": [1, 2.5e1, true, null]}}', ADDING]),
     "Let me look that up.", [("get_weather", {"city": 'São "Paulo"',
                                               "days": [1, 25.0, True, None]}),
                              ("add", {"x": 1, "y": 2})]),
    (tools.HERMES, hermes_answer([ADDING]), None, [("add", {"x": 1, "y": 2})]),
    (tools.HERMES, f"\n{PARIS}\n{ADDING}", None,  # bare, as Qwen2.5-Coder writes them
     [("get_weather", {"city": "Paris"}), ("add", {"x": 1, "y": 2})]),
    (tools.HERMES, "Use {braces}.", "Use {braces}.", []),
    (tools.HERMES, f"{tools.FENCES[0]}{ADDING}\n```", None, [("add", {"x": 1, "y": 2})]),
    (tools.HERMES, f"```python\n{ADDING}\n```", None, [("add", {"x": 1, "y": 2})]),
    (tools.HERMES, f"```\n{ADDING}\n```", None, [("add", {"x": 1, "y": 2})]),
    (tools.HERMES, '```python\n{\n  "name": "add",\n  "arguments": {\n    "x": 1, "y": 2\n  }\n}\n```',
     None, [("add", {"x": 1, "y": 2})]),  # pretty-printed, as a model writes code
    (tools.HERMES, f"{tools.FENCES[0]}[1]\n```", f"{tools.FENCES[0]}[1]\n```", []),
    (tools.HERMES, "```python\nx = 1\n```", "```python\nx = 1\n```", []),
    (tools.HERMES, "```json", "```json", []),
    (tools.HERMES, "No tool needed: 4 < 5.\n", "No tool needed: 4 < 5.\n", []),
    (tools.HERMES, "cut short <tool_", "cut short <tool_", []),
    (tools.GENERIC, f'{{"tool_calls": [{PARIS}, {ADDING}]}}', None,
     [("get_weather", {"city": "Paris"}), ("add", {"x": 1, "y": 2})]),
    (tools.GENERIC, '{"response": "Hi \\ud83d\\ude00, \\"you\\"\\n"}', 'Hi 😀, "you"\n', []),
    (tools.GENERIC, "not JSON at all", "not JSON at all", []),
]


def replay(fmt: str, text: str, cuts: list[int]) -> tuple[str | None, list[tuple]]:
    """The deltas of `text` fed in pieces cut at `cuts`, put back together as a client does."""
    parser, deltas, at = tools.ToolCallParser(fmt), [], 0
    for cut in cuts + [len(text)]:
        deltas += parser.feed(text[at:cut])
        at = cut
    deltas += parser.finish()
    content, calls = "", {}
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"} and d  # one kind of delta each
        content += d.get("content", "")
        for part in d.get("tool_calls", []):
            if "id" in part:  # the header comes once, first, with an empty argument text
                assert part["index"] not in calls and part["function"]["arguments"] == ""
                assert part["type"] == "function" and part["id"].startswith("call_")
                calls[part["index"]] = [part["function"]["name"], ""]
            calls[part["index"]][1] += part["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content or None, [(name, json.loads(args)) for name, args in calls.values()]


@pytest.mark.parametrize("fmt, text, content, calls", ANSWERS)
def test_answers_read_the_same_whole_and_streamed_in_any_pieces(fmt, text, content, calls):
    got_content, got_calls = tools.parse(text, fmt)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in got_calls] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)
    assert len({c["id"] for c in got_calls}) == len(got_calls)
    rng = random.Random(0)
    splits = [[i] for i in range(1, len(text))] + [list(range(1, len(text)))] + [
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 12))))
        for _ in range(50)]
    for cuts in splits:
        assert replay(fmt, text, cuts) == (content or None, calls), cuts


# -- refusals ----------------------------------------------------------------------------------
def with_parameters(schema) -> list[dict]:
    return [WEATHER, {"type": "function", "function": {"name": "f", "parameters": schema}}]


@pytest.mark.parametrize("tools_, choice, param, words", [
    (with_parameters({"type": "objekt"}), None, "tools[1].function.parameters", "objekt"),
    (with_parameters({"type": "object", "required": "city"}), None,
     "tools[1].function.parameters", "required"),
    (with_parameters({"type": "object", "properties": {"a": {"not": {}}}}), None,
     "tools[1].function.parameters", "not"),
    (with_parameters([1, 2]), None, "tools[1].function.parameters", "JSON Schema object"),
    ([WEATHER, WEATHER], None, "tools", "two tools"),
    ([WEATHER, {"type": "function", "function": {"description": "no name"}}], None, "tools",
     "tools[1].function.name"),
    ([{"type": "retrieval"}], None, "tools[0]", "only functions"),
    ("get_weather", None, "tools", "list"),
    (TOOLS, {"type": "function", "function": {"name": "sub"}}, "tool_choice", "'sub'"),
    (TOOLS, "sometimes", "tool_choice", "'sometimes'"),
    (TOOLS, {"type": "function"}, "tool_choice", "name"),
    (None, "required", "tool_choice", "needs tools"),
    (None, {"type": "function", "function": {"name": "add"}}, "tool_choice", "no tools"),
])
def test_bad_tools_are_refused_naming_the_field(tools_, choice, param, words):
    with pytest.raises(UserError) as err:
        tools.plan(tools_, choice)
    assert err.value.param == param
    message = str(err.value)
    assert words in message and "\n" not in message and len(message) < 300
