"""`edge-genarm chat`: the session on the real demo preset, the script mode through click's runner,
and the real program in a pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import os
import sys

import llama_cpp
import numpy as np
import pexpect
import pytest
from click.testing import CliRunner

from edge_genarm.chat import ChatSession, Resend
from edge_genarm.chat import chat as chat_command
from edge_genarm.cli import main
from edge_genarm.api import Model
from edge_genarm.errors import UserError
from edge_genarm.options import from_click
from hf_models import write_smollm2_tokenizer
from reference import reference_llama


def session(*args: str) -> ChatSession:
    """A session on the demo preset as `edge-genarm chat --preset demo --greedy ARGS` builds it:
    the shipped preset, its base (@smollm2-q8) and its default alphas (positive 1, concise 0)."""
    ctx = chat_command.make_context("chat", ["--preset", "demo", "--greedy", "-n", "24",
                                             "--seed", "7", *args])
    with ctx:  # the preset fills only what the command line left out, as in the command
        params = dict(ctx.params)
        config = from_click(params, preset=params.pop("preset"), parallel=("--parallel", 1))
    return ChatSession(Model(config))


@pytest.fixture
def chat():
    s = session()
    yield s
    s.model.close()


def seq_of(chat):
    """The one sequence of the chat's model: the conversation's cache, kept between turns."""
    [seq] = chat.model.scheduler._idle.values()
    return seq


def test_the_session_is_the_demo_preset_as_shipped(chat, demo_base):
    assert chat.engine.model.path == demo_base
    assert {a.name: (a.alpha, a.kind) for a in chat.engine.arms} == {
        "positive": (1.0, "lora"), "concise": (0.0, "lora")}
    assert chat.engine.n_ctx == 2048 and chat.defaults.max_tokens == 24


def test_a_second_turn_decodes_only_its_new_tokens(chat):
    first = chat.reply("Tell me about a rainy afternoon.")
    r1 = chat.last
    assert first.reply and r1.prefilled_tokens == len(r1.prompt_ids)
    chat.reply("And a sunny one?")
    r2 = chat.last
    assert r2.prompt_ids[:len(r1.prompt_ids)] == r1.prompt_ids
    # The first reply's tokens are in the caches; only the closing of that turn and the new
    # message are decoded (a few tokens may re-tokenize differently at the seam).
    assert r2.prefilled_tokens < len(r2.prompt_ids) - len(r1.prompt_ids) - len(r1.tokens) + 4
    for ctx in [chat.engine.base] + [a.context for a in chat.engine.active_arms()]:
        assert seq_of(chat).behind(ctx) == len(seq_of(chat).tokens)


def test_rendered_conversation_matches_hugging_face(chat, smollm2, tmp_path):
    from transformers import AutoTokenizer

    chat.system = "You are brief."
    chat.reply("Tell me about a rainy afternoon.")
    chat.reply("Now about snow, with \"quotes\" and é.")
    hf = AutoTokenizer.from_pretrained(write_smollm2_tokenizer(smollm2, tmp_path / "tok"))
    messages = chat.messages(chat.turns) + [{"role": "user", "content": "Third?"}]
    assert messages[0] == {"role": "system", "content": "You are brief."}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 2 + ["user"]
    from edge_genarm.generation import encode_messages
    from edge_genarm.templates import render_chat
    text = render_chat(chat.template, messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert encode_messages(chat.engine, messages, chat.template) == hf(text)["input_ids"]


SECOND = "Give me three tips for a good morning."


def arm(chat, name):
    return next(a for a in chat.engine.arms if a.name == name)


def retried(chat):
    """The last message answered again (/retry), under the alphas set now."""
    resend = chat.command("/retry")
    assert isinstance(resend, Resend)
    return chat.reply(resend.text)


def last_logits(ctx_ptr, n_vocab: int) -> np.ndarray:
    """The logits of a context's last decoded token, read from llama.cpp directly."""
    ptr = llama_cpp.llama_get_logits_ith(ctx_ptr, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def assert_arm_holds(chat, name, batches):
    """The ARM's logits equal those of a separate llama-cpp-python context of its adapter fed
    the same tokens in the same batches (so the same kernels run): its cache holds exactly the
    conversation, whatever it missed and caught up on."""
    a = arm(chat, name)
    assert sum(batches, []) == seq_of(chat).tokens
    reference = reference_llama(chat.engine.model.path, lora_path=str(a.path), n_ctx=1024,
                                flash_attn=True, verbose=False)
    try:
        for batch in batches:
            reference.eval(batch)
        expected = last_logits(reference.ctx, reference.n_vocab())
    finally:
        reference.close()
    np.testing.assert_allclose(last_logits(a.context.ptr, a.context.model.n_vocab), expected,
                               atol=1e-3)


def one_by_one(tokens):
    return [[t] for t in tokens]


def test_concise_switched_on_catches_up_and_changes_the_reply(chat):
    """Only concise changes (positive stays at the preset's 1)."""
    concise = arm(chat, "concise").context
    chat.reply("Tell me about a rainy afternoon.")
    # after this message each ARM moves the first greedy token by a clear margin (0.7 and 1.0
    # here); after some others, such as "What should I wear?", SmolLM2 repeats its last answer
    # whatever the alphas
    chat.reply(SECOND)
    # the reply to compare with is a /retry as well, so both go through the caches alike
    default = retried(chat)
    assert default.settings["alphas"] == {"positive": 1.0, "concise": 0.0}
    assert default.settings["method"] == "genarm"
    assert seq_of(chat).behind(concise) == 0  # alpha 0: never stepped
    assert chat.command("/alpha concise=1") == "positive = 1\nconcise = 1"
    on = retried(chat)
    assert on.settings["alphas"] == {"positive": 1.0, "concise": 1.0}
    seq = seq_of(chat)
    n = len(seq.tokens)  # both turns, this reply included
    assert seq.behind(concise) == seq.behind(chat.engine.base) == n
    assert seq.behind(arm(chat, "positive").context) == n
    assert on.reply != default.reply
    # concise caught up on both turns at once, then followed the reply token by token
    prompt = chat.last.prompt_ids
    assert_arm_holds(chat, "concise", [prompt] + one_by_one(seq_of(chat).tokens[len(prompt):]))


def test_positive_switched_off_is_not_stepped_and_catches_up_when_back_on(chat):
    """Only positive changes (concise stays at the preset's 0)."""
    positive = arm(chat, "positive").context
    chat.reply("Tell me about a rainy afternoon.")
    first_prompt = len(chat.last.prompt_ids)
    assert chat.command("/alpha positive=0") == "positive = 0  (off)\nconcise = 0  (off)"
    chat.reply(SECOND)
    off = retried(chat)
    assert off.settings["alphas"] == {"positive": 0.0, "concise": 0.0}
    seq = seq_of(chat)
    missed = seq.behind(positive)  # it holds the first turn only
    assert first_prompt < missed < seq.behind(chat.engine.base) == len(seq.tokens)
    assert chat.command("/alpha positive=1") == "positive = 1\nconcise = 0  (off)"
    on = retried(chat)
    assert on.settings["alphas"] == {"positive": 1.0, "concise": 0.0}
    seq = seq_of(chat)
    assert seq.behind(positive) == seq.behind(chat.engine.base) == len(seq.tokens)
    assert on.reply != off.reply
    # positive: the first prompt, its reply token by token, then what it missed at once, then
    # this reply token by token
    tokens, prompt = seq_of(chat).tokens, chat.last.prompt_ids
    assert_arm_holds(chat, "positive", [tokens[:first_prompt]]
                     + one_by_one(tokens[first_prompt:missed]) + [tokens[missed:len(prompt)]]
                     + one_by_one(tokens[len(prompt):]))


def test_old_turns_leave_the_prompt_when_the_context_is_full():
    s = session("-c", "256", "-n", "40", "--system", "Answer kindly.")
    notes = []
    long = "Please tell me, in detail, everything about keeping houseplants alive in winter. "
    try:
        for _ in range(4):
            s.reply(long * 2, notify=notes.append)
        assert s.first > 0 and len(s.turns) == 4
        assert any("left the prompt" in n for n in notes)
        live = s.messages(s.turns[s.first:])
        assert live[0] == {"role": "system", "content": "Answer kindly."}
        assert len(s.transcript()["messages"]) == 1 + 2 * 4  # the transcript keeps every turn
        with pytest.raises(UserError, match="context holds 256"):
            s.reply(long * 20)
        assert len(s.turns) == 4  # the refused message left nothing behind
    finally:
        s.model.close()


def test_commands_answer_bad_input_with_one_line(chat, tmp_path):
    for line, message in [("/temp hot", "/temp hot: write a number"),
                          ("/alpha nobody=1", "no ARM named 'nobody'"),
                          ("/alpha positive", "^/alpha positive: write NAME=VALUE, for example "),
                          ("/alpha positive=inf", "^/alpha positive must be a finite number, "
                           "got inf$"),
                          ("/retry", "nothing to retry yet"),
                          ("/save", "needs a file name"),
                          (f"/save {tmp_path}/missing/dir/t.json", "cannot write"),
                          ("/frobnicate", "unknown command /frobnicate")]:
        with pytest.raises(UserError, match=message):
            chat.command(line)
    assert list(tmp_path.iterdir()) == []
    assert chat.command("/temp 0.5") == "temperature 0.5"
    assert chat.command("/system Be kind.") == "system prompt: Be kind."
    assert chat.command("/system -") == "no system prompt"
    assert chat.command("/stats") == "no reply yet"
    assert "/alpha [NAME=VALUE]" in chat.command("/help")


def test_script_mode_replies_equal_generate(smollm2):
    args = ["--preset", "demo", "--greedy", "-n", "20"]
    gen = CliRunner().invoke(main, ["generate", *args, "Tell me about a rainy afternoon."])
    assert gen.exit_code == 0, gen.stderr
    res = CliRunner().invoke(main, ["chat", *args], input="Tell me about a rainy afternoon.\n"
                             "/alpha positive=0\n\nWhat about a snowy one?\n")
    assert res.exit_code == 0, res.stderr
    first, second = res.stdout.split("\n")[:2]
    assert first + "\n" == gen.stdout
    assert second and res.stdout == f"{first}\n{second}\n"
    assert res.stderr == "positive = 0  (off)\nconcise = 0  (off)\n"


def test_script_mode_bad_line_is_reported_and_the_rest_runs(smollm2):
    res = CliRunner().invoke(main, ["chat", "--preset", "demo", "--greedy", "-n", "8"],
                             input="/temp x\nHello!\n")
    assert res.exit_code == 1
    assert res.stdout.count("\n") == 1 and res.stdout.strip()
    assert res.stderr.splitlines() == ["Error: /temp x: write a number >= 0, for example /temp 0.7",
                                       "Error: some lines of the input failed (see above)"]


def spawn_chat(tmp_path, *args) -> pexpect.spawn:
    env = dict(os.environ, HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
    child = pexpect.spawn(sys.executable, ["-m", "edge_genarm", "chat", "--preset", "demo",
                                           "--greedy", *args], env=env, encoding="utf-8",
                          # a bound on a hung child, not a speed check: on a busy 2-core machine a
                          # 200-token reply has taken over 2 minutes
                          timeout=360, dimensions=(40, 200))
    child.expect_exact("Ctrl-D leaves.")
    child.expect_exact("> ")
    return child


def ask(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect_exact("> ")
    return child.before.split("\n", 1)[1].strip()  # drop the echoed input line


def test_terminal_conversation_alpha_interrupt_save(tmp_path):
    child = spawn_chat(tmp_path, "-n", "200")
    try:
        first = ask(child, "Tell me about a rainy afternoon.")
        second = ask(child, "What should I wear?")
        assert first and second and first != second
        assert ask(child, "/alpha positive=0") == "positive = 0  (off)\r\nconcise = 0  (off)"
        retried = ask(child, "/retry")
        assert retried and retried != second
        child.sendline("Write a very long story about a dragon and a knight.")
        # the terminal echoes the line before the program reads it, and a Ctrl-C before the
        # read makes the terminal drop it: wait for the reply itself to stream
        child.expect_exact("a dragon and a knight.\r\n")
        child.expect(r"\w+ \w+ \w+ \w+")
        child.sendintr()
        child.expect_exact("[reply stopped; the conversation goes on]")
        child.expect_exact("> ")
        assert ask(child, "Thanks. One more word?")
        path = tmp_path / "t.json"
        assert ask(child, f"/save {path}") == f"saved 4 turns to {path}"
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    data = json.loads(path.read_text())
    replies = [m for m in data["messages"] if m["role"] == "assistant"]
    assert [r["settings"]["finish_reason"] for r in replies][2] == "interrupted"
    assert replies[1]["settings"]["alphas"] == {"positive": 0.0, "concise": 0.0}
    assert replies[0]["content"] == first.replace("\r\n", "\n")
    history = (tmp_path / "state" / "edge-genarm" / "chat_history").read_text()
    assert "What should I wear?" in history
