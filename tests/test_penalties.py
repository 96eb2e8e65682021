"""The repetition penalties: pure NumPy on hand-written histories, then against llama.cpp itself.

The reference is llama.cpp's own samplers (`llama_sampler_init_dry`, `llama_sampler_init_penalties`)
called here through llama_cpp's ctypes bindings, on vocabularies loaded here too: they are fed
the history with `llama_sampler_accept` and applied to a row, and edge-genarm's row must equal
theirs, float32 for float32, at every step of real token histories from the real tokenizers.
"""

from __future__ import annotations

import contextlib
import ctypes
import math

import numpy as np
import pytest

import llama_cpp
from edge_genarm import penalties
from edge_genarm.llama import Model
from edge_genarm.registry import resolve_model
from edge_genarm.sampling import DRY_BREAKERS, SamplingSettings

# llama_token_data as NumPy sees it: a row handed to a llama.cpp sampler without a Python loop
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def row(n=8):
    return np.zeros(n, dtype=np.float32)


# -- pure NumPy ------------------------------------------------------------------------------------

def test_presence_and_frequency_follow_openai():
    out = penalties.occurrence_penalty(row(), [3, 3, 5], presence=0.5, frequency=0.25)
    expected = row()
    expected[3] = -(0.5 + 2 * 0.25)
    expected[5] = -(0.5 + 0.25)
    np.testing.assert_allclose(out, expected)


def test_repeat_lengths_find_the_longest_run_each_token_would_extend():
    # ... 1 2 3 [4] ... 1 2 3: writing 4 would repeat "1 2 3 4"; 9 follows "3" only once
    tokens, runs = penalties.repeat_lengths([1, 2, 3, 4, 7, 3, 9, 1, 2, 3])
    assert dict(zip(tokens.tolist(), runs.tolist())) == {4: 3, 9: 1}


def test_repeat_lengths_of_a_loop_overlap_themselves():
    # "5 6 5 6 5": the suffix "5 6 5" reappears at the start, and 6 followed it
    tokens, runs = penalties.repeat_lengths([5, 6, 5, 6, 5])
    assert dict(zip(tokens.tolist(), runs.tolist())) == {6: 3}


def test_a_breaker_stops_the_match_and_is_itself_never_penalized():
    """llama.cpp's rules: a repeat reaches back no further than the last breaker; a token that
    is a breaker by itself is spared even where it would extend a repeat (the old behaviour
    penalized it); a breaker at the end stops everything."""
    single = np.zeros(16, dtype=bool)
    single[0] = True  # say, a newline
    breakers = penalties.Breakers(single)
    history = np.array([1, 2, 3, 4, 0, 1, 2, 3])
    limit = penalties.repeat_limit(history, breakers)
    assert limit == 3
    tokens, runs = penalties.repeat_lengths(history, limit)
    assert dict(zip(tokens.tolist(), runs.tolist())) == {4: 3}
    history = np.array([7, 1, 2, 0, 9, 1, 2])  # of the suffix "9 1 2", "1 2" occurred, then 0
    tokens, runs = penalties.repeat_lengths(history, penalties.repeat_limit(history, breakers))
    assert dict(zip(tokens.tolist(), runs.tolist())) == {0: 2}
    out = penalties.dry_penalty(row(16), history, 1.0, 1.75, 2, breakers)
    assert not out.any()  # 0 would extend "1 2", but 0 is a breaker
    out = penalties.dry_penalty(row(16), history, 1.0, 1.75, 2)
    assert out[0] == pytest.approx(-1.0)  # without breakers it is an ordinary token
    assert penalties.repeat_limit(np.array([1, 2, 0, 1, 2, 0]), breakers) == 0


def test_a_breaker_of_several_tokens_counts_only_once_complete():
    """Token 4 heads the breaker "4 1 2": the repeat is cut after its last token, not at 4, and
    4 alone (not followed by 1 2) cuts nothing; 4 is penalized like any token."""
    breakers = penalties.Breakers(np.zeros(8, dtype=bool), {4: ((1, 2),)})
    assert penalties.repeat_limit(np.array([3, 4, 1, 2, 5, 6]), breakers) == 2
    assert penalties.repeat_limit(np.array([3, 4, 1, 5, 6]), breakers) == 5
    assert penalties.repeat_limit(np.array([3, 5, 6, 4, 1]), breakers) == 5  # tail cut off
    out = penalties.dry_penalty(row(), [4, 5, 4, 5], 1.0, 1.0, 2, breakers)
    assert out[4] == pytest.approx(-1.0)  # 4 would extend "4 5" to "4 5 4"


def test_breakers_are_processed_as_llama_cpp_processes_them():
    """A piece that holds a breaker is one by itself; a piece that ends with a breaker's start
    heads it, and its tail is the rest of the breaker, tokenized alone."""
    pieces = [b"a", b"b", b"\n", b"x\ny", b"xa", b"ab", b"c", b"bc"]
    vocab = {b"c": 6, b"bc": 7}
    breakers = penalties.process_breakers(["\n", "abc"], pieces,
                                          lambda data: [vocab[data]])
    assert np.flatnonzero(breakers.single).tolist() == [2, 3]
    # "a" and "xa" leave "bc" to come, "ab" leaves "c"; "b" ends with no start of "abc"
    assert breakers.tails == {0: ((7,),), 4: ((7,),), 5: ((6,),)}
    assert penalties.process_breakers([], pieces, lambda data: []) is None


def test_dry_penalty_grows_with_the_repeat_and_spares_short_ones():
    history = [1, 2, 3, 4, 7, 3, 9, 1, 2, 3]
    out = penalties.dry_penalty(row(), history, multiplier=0.8, base=1.75, allowed_length=2)
    expected = row()
    expected[4] = -0.8 * 1.75 ** (3 - 2)  # "1 2 3" repeated: 4 would make it 4 long
    np.testing.assert_allclose(out, expected, rtol=1e-6)  # 9 follows a 1-token repeat: spared


def test_dry_penalty_has_no_cap_only_llama_cpps_overflow_clamp():
    """llama.cpp has no cap on the penalty (edge-genarm's old one was 40): a loop of 120 tokens
    costs 0.8 * 1.75 ** 114; past 88.72 / ln 1.75 = 158 the exponent stops growing."""
    loop = [1, 2, 3, 4] * 30
    out = penalties.dry_penalty(row(), loop, multiplier=0.8, base=1.75, allowed_length=2)
    assert out[1] == pytest.approx(-0.8 * 1.75 ** 114, rel=1e-6) and np.count_nonzero(out) == 1
    flat = penalties.dry_penalty(row(), loop, multiplier=0.5, base=1.0, allowed_length=2)
    assert flat[1] == pytest.approx(-0.5)  # base 1: the same penalty at every length
    assert penalties.max_exponent(1.75) == 158
    long = penalties.dry_penalty(row(), [1, 2, 3, 4] * 60, 0.8, 1.75, 2)
    assert long[1] == pytest.approx(-0.8 * 1.75 ** 158, rel=1e-6)  # 236 long, clamped at 158
    assert penalties.dry_penalty(row(), [1, 2, 3, 4] * 60, 100.0, 1.75, 2)[1] == -np.inf


def test_penalize_leaves_the_row_alone_when_off_and_on_an_empty_history():
    r = np.log(np.full(8, 1 / 8, dtype=np.float32))
    assert penalties.penalize(r, [1, 2, 1, 2], SamplingSettings()) is r
    on = SamplingSettings(presence_penalty=1.0, dry_multiplier=1.0)
    assert penalties.penalize(r, [], on) is r
    out = penalties.penalize(r, [1, 2, 1, 2, 1], on)
    assert out[2] == pytest.approx(r[2] - 1.0 - 1.0 * 1.75 ** (3 - 2))
    assert out[1] == pytest.approx(r[1] - 1.0)
    assert out[0] == r[0]


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", 2.5, "presence_penalty must be between -2 and 2"),
    ("frequency_penalty", float("nan"), "frequency_penalty must be between -2 and 2"),
    ("dry_multiplier", -1.0, "dry_multiplier must be a finite number >= 0"),
    ("dry_base", 0.5, "dry_base must be a finite number >= 1"),
    ("dry_allowed_length", 0, "dry_allowed_length must be >= 1"),
    ("dry_sequence_breakers", ("",), "dry_sequence_breakers must be a non-empty string"),
])
def test_settings_refuse_penalties_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{field: value}).validate()


# -- against llama.cpp --------------------------------------------------------------------------

@contextlib.contextmanager
def llama_vocab(path):
    """A vocabulary loaded by llama_cpp itself (no weights), for the reference samplers."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, path
    try:
        yield llama_cpp.llama_model_get_vocab(model)
    finally:
        llama_cpp.llama_model_free(model)


def llama_tokenize(vocab, text: str) -> list[int]:
    data = text.encode()
    buf = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
    assert n >= 0
    return list(buf[:n])


def llama_dry(vocab, multiplier, base, allowed_length, last_n, breakers):
    """llama.cpp's DRY sampler; the caller frees it."""
    strings = (ctypes.c_char_p * max(len(breakers), 1))(*[b.encode() for b in breakers])
    return llama_cpp.llama_sampler_init_dry(vocab, multiplier, base, allowed_length, last_n,
                                            strings, len(breakers))


def llama_apply(sampler, logits: np.ndarray) -> np.ndarray:
    """The row after the sampler's `apply`, by token id (DRY and penalties keep the order)."""
    data = np.zeros(logits.size, dtype=TOKEN_DATA)
    data["id"], data["logit"] = np.arange(logits.size), logits
    array = llama_cpp.llama_token_data_array(
        data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), logits.size, -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    assert (data["id"] == np.arange(logits.size)).all()
    return data["logit"].copy()


def llama_dry_rows(vocab, history, logits, multiplier, base, allowed_length, breakers,
                   last_n=None):
    """llama.cpp's DRY row after each token of the history (last_n None: all of it)."""
    sampler = llama_dry(vocab, multiplier, base, allowed_length,
                        last_n or max(len(history), 1), breakers)
    try:
        out = []
        for token in history:
            llama_cpp.llama_sampler_accept(sampler, token)
            out.append(llama_apply(sampler, logits))
        return out
    finally:
        llama_cpp.llama_sampler_free(sampler)


# an answer that repeats itself: lines of code, a docstring written twice, prose with repeated
# phrases, and every breaker (a newline, ':', '"', '*') in it
CODE = ('def area(width, height):\n    """Return the area of a rectangle."""\n'
        '    return width * height\n\n\n'
        'def area(width, height):\n    """Return the area of a rectangle."""\n'
        '    return width * height\n\n'
        'for i in range(3): print(area(i, i))\nfor i in range(3): print(area(i, i))\n')
DOCSTRING = ('def mean(values):\n    """Return the mean of values: their sum over their count.\n\n'
             '    Return the mean of values: their sum over their count.\n    """\n'
             '    return sum(values) / len(values)\n')
PROSE = ('The cat sat on the mat, and then the cat sat on the mat again. The dog said "the cat '
         'sat on the mat" twice, *the cat sat on the mat*, and the cat sat on the mat.')
ANSWER = CODE + DOCSTRING + PROSE
# a loop with no breaker in it, long enough for the overflow clamp (exponent 158 at base 1.75)
LOOP = "It is the same answer as before, and it is the same answer as it was before. " * 12
MULTI_TOKEN = ("return width", "\n\n")  # breakers of several tokens

SETTINGS = {  # multiplier, base, allowed length, breakers, last_n
    "shipped": (0.8, 1.75, 2, DRY_BREAKERS, None),
    "base 1": (0.8, 1.0, 2, DRY_BREAKERS, None),
    "multiplier 100": (100.0, 1.75, 2, DRY_BREAKERS, None),
    "allowed 5, no breakers": (0.8, 1.75, 5, (), None),
    "no breakers": (0.8, 1.75, 2, (), None),
    "multi-token breakers": (0.8, 1.75, 2, MULTI_TOKEN, None),
    "last 64": (0.8, 1.75, 2, DRY_BREAKERS, 64),
}
LOOP_SETTINGS = {"shipped": (0.8, 1.75, 2, DRY_BREAKERS, None),
                 "multiplier 100": (100.0, 1.75, 2, (), None),
                 "base 3, last 120": (1.0, 3.0, 3, MULTI_TOKEN, 120)}


@pytest.fixture(scope="module", params=["@smollm2", "@qwen-coder-0.5b"])
def vocabulary(request):
    """(llama.cpp's vocabulary, edge-genarm's Model) of one real tokenizer, no weights."""
    path = resolve_model(request.param)
    model = Model(path, vocab_only=True)
    with llama_vocab(path) as vocab:
        yield vocab, model
    model.close()


def check_every_step(vocab, model, history, setting):
    """edge-genarm's DRY row equals llama.cpp's after every token of the history; returns the
    penalties llama.cpp gave (a list of arrays, one per step)."""
    multiplier, base, allowed, breakers, last_n = setting
    logits = (np.random.default_rng(len(history)).normal(size=model.n_vocab) * 4
              ).astype(np.float32)
    theirs = llama_dry_rows(vocab, history, logits, multiplier, base, allowed, breakers, last_n)
    ours_breakers = model.dry_breakers(breakers)
    given = []
    for i, expected in enumerate(theirs):
        ours = penalties.dry_penalty(logits, history[:i + 1], multiplier, base, allowed,
                                     ours_breakers, last_n)
        np.testing.assert_array_equal(ours, expected, err_msg=f"after {i + 1} tokens")
        given.append(logits - expected)
    return given


@pytest.mark.parametrize("name", SETTINGS)
def test_dry_equals_llama_cpp_on_real_answers(vocabulary, name):
    """Code, a docstring and prose that repeat themselves, at every step and each setting; at
    the shipped one, the breakers that would extend a repeat are spared, as in llama.cpp."""
    vocab, model = vocabulary
    history = llama_tokenize(vocab, ANSWER)
    assert len(llama_tokenize(vocab, MULTI_TOKEN[0])) > 1
    given = check_every_step(vocab, model, history, SETTINGS[name])
    penalized = sum(np.count_nonzero(g) for g in given)
    assert penalized > 10, "the answer no longer repeats itself"
    if name == "shipped":  # where a breaker would extend a repeat, llama.cpp spares it
        breakers = model.dry_breakers(DRY_BREAKERS)
        spared = []
        for i in range(1, len(history)):
            window = np.array(history[:i])
            tokens, runs = penalties.repeat_lengths(
                window, penalties.repeat_limit(window, breakers))
            if breakers.single[history[i]] and history[i] in tokens[runs >= 2]:
                spared.append(i)
        assert spared and all(given[i - 1][history[i]] == 0 for i in spared)


@pytest.mark.parametrize("name", LOOP_SETTINGS)
def test_dry_equals_llama_cpp_on_a_long_loop(vocabulary, name):
    """Repeats far past the overflow clamp: float32's largest penalties and infinity."""
    vocab, model = vocabulary
    history = llama_tokenize(vocab, LOOP)
    given = check_every_step(vocab, model, history, LOOP_SETTINGS[name])
    multiplier, base = LOOP_SETTINGS[name][:2]
    biggest = max(float(g.max()) for g in given)
    with np.errstate(over="ignore"):  # 100 * 1.75 ** 158 is past float32: infinity
        clamped = np.float32(multiplier * math.pow(base, penalties.max_exponent(base)))
    assert biggest == clamped  # 2e38 at 0.8, not infinity: the clamp; and no cap


def test_breakers_are_llama_cpps_tokens(vocabulary):
    """The tokens that are a breaker by themselves are those whose text, as llama_cpp renders
    each token (special tokens as their text), holds a breaker; a breaker of several tokens is
    headed by the tokens that end with its start, followed by the rest tokenized alone."""
    vocab, model = vocabulary
    breakers = model.dry_breakers(DRY_BREAKERS)
    buf = ctypes.create_string_buffer(256)
    wanted = [b.encode() for b in DRY_BREAKERS]
    expected = np.zeros(model.n_vocab, dtype=bool)
    for token in range(model.n_vocab):
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        expected[token] = any(w in buf.raw[:n] for w in wanted)
    np.testing.assert_array_equal(breakers.single, expected)
    assert not breakers.tails  # single characters: no token ends with a part of one
    for text in ("\n", ":", '"', "*", "\n\n", "):", '"""'):
        assert all(breakers.single[t] for t in llama_tokenize(vocab, text)), text
    assert not any(breakers.single[t] for t in llama_tokenize(vocab, "hello world"))
    head, *rest = llama_tokenize(vocab, MULTI_TOKEN[0])  # "return", " width"
    multi = model.dry_breakers(MULTI_TOKEN)
    assert tuple(rest) in multi.tails[head] and not multi.single[head]
    newline = llama_tokenize(vocab, "\n")[0]
    assert multi.tails[newline] == ((newline,),)  # "\n" then "\n" is the breaker "\n\n"
    assert model.dry_breakers(()) is None


def test_presence_and_frequency_equal_llama_cpps_penalties(vocabulary):
    """OpenAI's penalties are llama.cpp's `penalties` sampler with repeat 1 over the history."""
    vocab, model = vocabulary
    history = llama_tokenize(vocab, ANSWER)
    logits = (np.random.default_rng(1).normal(size=model.n_vocab) * 4).astype(np.float32)
    sampler = llama_cpp.llama_sampler_init_penalties(model.n_vocab, len(history), 1.0,
                                                     0.3, 0.7)
    try:
        for token in history:
            llama_cpp.llama_sampler_accept(sampler, token)
        expected = llama_apply(sampler, logits)
    finally:
        llama_cpp.llama_sampler_free(sampler)
    settings = SamplingSettings(presence_penalty=0.7, frequency_penalty=0.3)
    np.testing.assert_array_equal(penalties.penalize(logits, history, settings), expected)
