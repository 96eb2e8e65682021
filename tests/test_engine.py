"""Engine tests on tiny GGUF models written by the tests (random weights, SmolLM2's vocabulary)."""

from __future__ import annotations

import ctypes
import dataclasses

import llama_cpp
import numpy as np
import pytest

from conftest import make_engine, reference_log_softmax
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.errors import IncompatibleModelsError, ModelFileError
from edge_genarm.generation import run_to_end
from edge_genarm.llama import ContextSettings, _chunks
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler
from tiny_models import TinySpec, tiny_weights, write_tiny_model
from reference import reference_llama

GREEDY = Request((), SamplingSettings(greedy=True), max_tokens=16)


def prompt(engine, text="Hello world, this is a test"):
    return engine.model.tokenize(text, add_special=True)


def run(engine, req=GREEDY, text="Hello world, this is a test", ids=None):
    ids = prompt(engine, text) if ids is None else ids
    with Scheduler(engine) as scheduler:
        handle = scheduler.submit(dataclasses.replace(req, prompt_ids=tuple(ids)))
        return run_to_end(scheduler, [handle])[0][0]


def guided_trace(engine, ids, n):
    """Greedy tokens and the guided log-probs of every step."""
    seq = engine.new_sequence()
    logprobs = engine.advance([seq], [ids])
    tokens, rows = [], []
    for _ in range(n):
        rows.append(np.array(logprobs))
        tokens.append(int(np.argmax(logprobs)))
        logprobs = engine.advance([seq], [[tokens[-1]]])
    return tokens, np.stack(rows)


def test_lora_arm_equals_the_same_arm_merged_into_a_full_model(tiny):
    with make_engine(tiny.base, [(tiny.lora, 1.0)]) as e:
        assert e.arms[0].kind == "lora"
        assert e.arms[0].context.model is e.base.model  # the base weights are held once
        lora_tokens, lora_rows = guided_trace(e, prompt(e), 16)
    with make_engine(tiny.base, [(tiny.merged, 1.0)]) as e:
        assert e.arms[0].kind == "model"
        merged_tokens, merged_rows = guided_trace(e, prompt(e), 16)
    with make_engine(tiny.base) as e:
        plain_tokens, _ = guided_trace(e, prompt(e), 16)
    assert lora_tokens == merged_tokens
    assert lora_tokens != plain_tokens  # the adapter really steers
    top = np.argsort(-merged_rows, axis=1)[:, :50]  # compare where the probability is
    diff = np.abs(np.take_along_axis(lora_rows, top, 1) - np.take_along_axis(merged_rows, top, 1))
    assert diff.max() < 1e-4


def test_a_lora_of_another_model_guides_as_that_lora_merged(tiny):
    """MODEL+ADAPTER: an ARM that is a LoRA of a model other than the base (weak to strong with
    a LoRA ARM) equals the same LoRA merged into that model, used as a full-model ARM."""
    settings = ContextSettings(n_ctx=256, exact=True)
    spec = ArmSpec(tiny.base, 1.0, adapter=tiny.lora)
    assert spec.name == "lora"
    with Engine.load(EngineConfig(tiny.arm, [spec], settings)) as e:
        assert e.arms[0].kind == "lora" and e.arms[0].context.model is not e.base.model
        pair_tokens, pair_rows = guided_trace(e, prompt(e), 16)
    with make_engine(tiny.arm, [(tiny.merged, 1.0)]) as e:
        merged_tokens, merged_rows = guided_trace(e, prompt(e), 16)
    assert pair_tokens == merged_tokens
    top = np.argsort(-merged_rows, axis=1)[:, :50]
    diff = np.abs(np.take_along_axis(pair_rows, top, 1) - np.take_along_axis(merged_rows, top, 1))
    assert diff.max() < 1e-4
    with pytest.raises(ModelFileError, match="needs the full model first"):
        Engine.load(EngineConfig(tiny.arm, [ArmSpec(tiny.lora, 1.0, adapter=tiny.lora)],
                                 settings))


def test_a_base_with_an_adapter_runs_as_that_adapter_merged(tiny):
    """--base MODEL+ADAPTER: the base context carries the LoRA; equal to the merged model, and
    an ARM still guides it."""
    settings = ContextSettings(n_ctx=256, exact=True)
    config = EngineConfig(tiny.base, [ArmSpec(tiny.arm, 0.5)], settings, base_adapter=tiny.lora)
    with Engine.load(config) as e:
        assert e.base.adapter is not None
        pair_tokens, pair_rows = guided_trace(e, prompt(e), 16)
    with make_engine(tiny.merged, [(tiny.arm, 0.5)]) as e:
        merged_tokens, merged_rows = guided_trace(e, prompt(e), 16)
    with make_engine(tiny.base, [(tiny.arm, 0.5)]) as e:
        plain_tokens, _ = guided_trace(e, prompt(e), 16)
    assert pair_tokens == merged_tokens != plain_tokens
    top = np.argsort(-merged_rows, axis=1)[:, :50]
    diff = np.abs(np.take_along_axis(pair_rows, top, 1) - np.take_along_axis(merged_rows, top, 1))
    assert diff.max() < 1e-4
    for adapter, error, message in [
            (tiny.lora_qwen, IncompatibleModelsError, "is for architecture 'qwen2'"),
            (tiny.lora_small, IncompatibleModelsError, "does not fit blk.0"),
            (tiny.arm, IncompatibleModelsError, "is a full model, not a LoRA adapter; after '\\+' "
             "name the adapter GGUF")]:
        with pytest.raises(error, match=message):
            Engine.load(EngineConfig(tiny.base, [], settings, base_adapter=adapter))


def _reference_guided_greedy(base, arms, ids, n):
    """Independent computation: separately driven llama-cpp-python contexts, maths in float64."""
    def open_ctx(path, lora=None):
        return reference_llama(path, n_ctx=256, type_k=0, type_v=0, flash_attn=False,
                               lora_path=str(lora) if lora else None, verbose=False)

    def last_logits(llm):
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    base_llm = open_ctx(base)
    arm_llms = [(open_ctx(base, lora=p) if lora else open_ctx(p), a) for p, a, lora in arms]
    for llm in [base_llm] + [x for x, _ in arm_llms]:
        llm.eval(ids)
    tokens = []
    for _ in range(n):
        guided = reference_log_softmax(last_logits(base_llm))
        for llm, alpha in arm_llms:
            guided = guided + alpha * reference_log_softmax(last_logits(llm))
        tokens.append(int(np.argmax(guided)))
        for llm in [base_llm] + [x for x, _ in arm_llms]:
            llm.eval([tokens[-1]])
    for llm in [base_llm] + [x for x, _ in arm_llms]:
        llm.close()
    return tokens


def test_guided_greedy_equals_an_independent_computation_with_two_arms(tiny):
    arms = [(tiny.arm, 0.7, False), (tiny.lora, -0.4, True)]
    with make_engine(tiny.base, [(p, a) for p, a, _ in arms]) as e:
        ids = prompt(e)
        ours = run(e).tokens
    assert ours == _reference_guided_greedy(tiny.base, arms, ids, len(ours))


PAD = 64


@pytest.fixture(scope="module")
def heavy_tail(tiny, tokenizer, tmp_path_factory):
    """A padded model whose 64 padding tokens out-score every real token at every position, so a
    row that let the padding in would be taken over by it.

    Embedding dimension 0 is the same for every token and no block writes to it, so after the
    final norm it is positive; the padding rows of the output matrix read only that dimension.
    """
    spec = TinySpec(seed=6, extra_tokens=PAD)
    w = tiny_weights(spec, len(next(v for k, v, _ in tokenizer if k == "tokenizer.ggml.tokens"))
                     + PAD)
    w["token_embd.weight"][:, 0] = 3.0
    for i in range(spec.n_layer):
        w[f"blk.{i}.attn_output.weight"][0, :] = 0.0
        w[f"blk.{i}.ffn_down.weight"][0, :] = 0.0
    w["output.weight"][-PAD:, :] = 0.0
    w["output.weight"][-PAD:, 0] = np.linspace(60.0, 40.0, PAD)
    path = tmp_path_factory.mktemp("heavy") / "heavy_tail.gguf"
    write_tiny_model(path, spec, tokenizer, w)
    return path


def _reference_rows(models, ids, steps):
    """Guided rows, normalised over the common range, from separately driven llama-cpp-python
    contexts (float64): each model's log-softmax over its own vocabulary, summed over
    [0, common size). `models`: (path, weight) pairs, the base first with weight 1."""
    llms = [(reference_llama(p, n_ctx=256, type_k=0, type_v=0, flash_attn=False,
                             verbose=False), a) for p, a in models]
    n = min(llm.n_vocab() for llm, _ in llms)
    rows, full_argmax = [], []
    for llm, _ in llms:
        llm.eval(ids)
    for token in steps + [None]:
        logits = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                        shape=(llm.n_vocab(),)).copy() for llm, _ in llms]
        full_argmax.append([int(np.argmax(x)) for x in logits])
        guided = sum(a * reference_log_softmax(x)[:n] for x, (_, a) in zip(logits, llms))
        rows.append(reference_log_softmax(guided))
        if token is not None:
            for llm, _ in llms:
                llm.eval([token])
    for llm, _ in llms:
        llm.close()
    return n, np.stack(rows), full_argmax


def _engine_rows(engine, ids, steps):
    seq = engine.new_sequence()
    rows = [np.array(engine.advance([seq], [ids]))]
    for token in steps:
        rows.append(np.array(engine.advance([seq], [[token]])))
    return np.stack(rows)


def test_padded_arm_vocabulary_is_aligned_by_slicing(tiny, heavy_tail):
    steps = [500, 1000, 42]
    with make_engine(tiny.base, [(heavy_tail, 0.6)]) as e:
        assert e.arms[0].context.model.n_vocab == e.model.n_vocab + PAD
        assert e.n_vocab == e.model.n_vocab
        ids = prompt(e)
        ours = _engine_rows(e, ids, steps)
    n, ref, full_argmax = _reference_rows([(tiny.base, 1.0), (heavy_tail, 0.6)], ids, steps)
    assert ours.shape == (len(steps) + 1, n)
    assert all(arm >= n for _, arm in full_argmax)  # the ARM's own best token is padding
    got = np.stack([reference_log_softmax(r) for r in ours])
    top = np.argsort(-ref, axis=1)[:, :200]  # where the probability is, and the whole row loosely
    np.testing.assert_allclose(np.take_along_axis(got, top, 1), np.take_along_axis(ref, top, 1),
                               atol=1e-4)
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_padding_of_a_padded_base_is_never_sampled(tiny, heavy_tail):
    """The base is the padded one: its padding would win every step, were it in the row."""
    arms = [(tiny.arm, 0.5)]
    with make_engine(heavy_tail, arms) as e:
        n = e.n_vocab
        assert n == e.model.n_vocab - PAD
        ids = prompt(e)
        greedy = run(e).tokens
        sampled = [run(e, Request((), SamplingSettings(temperature=1.0, top_k=0, top_p=1.0,
                                                   min_p=0.0), max_tokens=16, seed=s)).tokens
                   for s in (1, 2, 3)]
    _, ref, full_argmax = _reference_rows([(heavy_tail, 1.0), (tiny.arm, 0.5)], ids,
                                          greedy[:-1])
    assert all(base >= n for base, _ in full_argmax)  # the base's own best token is padding
    assert greedy == [int(np.argmax(r)) for r in ref]
    assert max(max(t) for t in sampled + [greedy]) < n


def test_arm_with_other_tokens_is_refused_naming_the_token(tiny):
    with pytest.raises(IncompatibleModelsError) as info:
        make_engine(tiny.base, [(tiny.renamed, 1.0)])
    msg = str(info.value)
    assert "token 1000" in msg and "'<<renamed>>'" in msg
    assert repr(tiny_token_text(tiny, 1000)) in msg


def tiny_token_text(tiny, i):
    with make_engine(tiny.base) as e:
        return e.model.token_text(i)


def test_adapter_checks(tiny):
    with pytest.raises(ModelFileError, match="is a LoRA adapter, not a model"):
        make_engine(tiny.lora)
    with pytest.raises(IncompatibleModelsError, match="architecture 'qwen2'.*'llama'"):
        make_engine(tiny.base, [(tiny.lora_qwen, 1.0)])
    with pytest.raises(IncompatibleModelsError, match="does not fit blk.0"):
        make_engine(tiny.base, [(tiny.lora_small, 1.0)])


def test_an_arm_model_is_placed_on_its_own_and_a_lora_of_the_base_follows_the_base(tiny):
    """An ARM's own model loads once per placement (the base file as an ARM placed alike shares
    the base's weights); a LoRA of the base cannot be placed apart from the base."""
    settings = ContextSettings(n_ctx=64)
    with Engine.load(EngineConfig(tiny.base, [ArmSpec(tiny.base, 1.0, "same")],
                                  settings)) as e:
        assert len(e._models) == 1
    config = EngineConfig(tiny.base, [ArmSpec(tiny.base, 1.0, "apart", n_gpu_layers=1)], settings)
    with Engine.load(config) as e:  # a CPU build runs the layers on the CPU all the same
        assert len(e._models) == 2 and e.arms[0].context.model is not e.base.model
    with pytest.raises(IncompatibleModelsError, match="the ARM 'lora' is a LoRA of the base and "
                       r"runs where the base's layers run; its GPU layers follow the base's \(0\)"):
        Engine.load(EngineConfig(tiny.base, [ArmSpec(tiny.lora, 1.0, n_gpu_layers=2)], settings))


def test_arm_with_alpha_zero_is_not_stepped_and_catches_up_when_switched_on(tiny):
    with make_engine(tiny.base, [(tiny.arm, 0.0)]) as e:
        arm_ctx = e.arms[0].context
        seq = e.new_sequence()
        ids = prompt(e)
        e.advance([seq], [ids])
        e.advance([seq], [[500]])
        assert seq.behind(arm_ctx) == 0  # never decoded
        e.arms[0].alpha = 0.8
        caught_up = np.array(e.advance([seq], [[501]]))
        assert seq.behind(arm_ctx) == len(ids) + 2
    with make_engine(tiny.base, [(tiny.arm, 0.8)]) as e:
        seq = e.new_sequence()
        e.advance([seq], [prompt(e)])
        e.advance([seq], [[500]])
        always_on = np.array(e.advance([seq], [[501]]))
    np.testing.assert_allclose(caught_up, always_on, atol=1e-4)


def test_several_sequences_in_one_batch_match_one_at_a_time(tiny):
    texts = ["Hello world", "The weather today is"]
    with make_engine(tiny.base, [(tiny.lora, 1.0)], n_seq_max=2) as e:
        seqs = [e.new_sequence(), e.new_sequence()]
        together = e.advance(seqs, [prompt(e, t) for t in texts]).copy()
        nxt = e.advance(seqs, [[int(np.argmax(r))] for r in together]).copy()
    for i, text in enumerate(texts):
        with make_engine(tiny.base, [(tiny.lora, 1.0)]) as e:
            seq = e.new_sequence()
            alone = e.advance([seq], [prompt(e, text)]).copy()
            alone_next = e.advance([seq], [[int(np.argmax(alone))]])
            np.testing.assert_allclose(together[i], alone, atol=1e-4)
            np.testing.assert_allclose(nxt[i], alone_next, atol=1e-4)


def test_a_copied_prefix_gives_what_decoding_it_again_gives(tiny):
    """copy_prefix hands a sequence another's cache (each context as far as it holds it); the
    ARM that never saw the prefix catches up, and the next logits equal a fresh decode."""
    with make_engine(tiny.base, [(tiny.arm, 0.5)], n_seq_max=3) as e:
        first = prompt(e, "Hello world, this is a test")
        second = first + prompt(e, " and more")[1:]
        donor = e.new_sequence()
        e.step([donor], [first], np.zeros((1, 1), dtype=np.float32))  # the ARM is not stepped
        assert donor.behind(e.arms[0].context) == 0
        copy = e.new_sequence()
        e.copy_prefix(donor, copy, len(first))
        assert copy.behind(e.base) == len(first) and copy.behind(e.arms[0].context) == 0
        before = e.base.n_decoded
        reused = np.array(e.advance([copy], [second[len(first):]]))
        assert e.base.n_decoded - before == len(second) - len(first)
        fresh = e.advance([e.new_sequence()], [second])
        np.testing.assert_allclose(reused, fresh, atol=1e-4)


def test_same_seed_same_text_and_other_seed_other_text(tiny):
    sampled = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    with make_engine(tiny.base, [(tiny.arm, 0.5)]) as e:
        a = run(e, Request((), sampled, max_tokens=12, seed=11))
        b = run(e, Request((), sampled, max_tokens=12, seed=11))
        c = run(e, Request((), sampled, max_tokens=12, seed=12))
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_full_context_ends_the_answer_with_a_reason(tiny):
    with make_engine(tiny.base, n_ctx=32) as e:
        ids = prompt(e)
        result = run(e, Request((), SamplingSettings(greedy=True), max_tokens=100), ids=ids)
    assert result.finish_reason == "context_full"
    assert len(ids) + len(result.tokens) == 33  # the window is full, and one token sampled last


def test_logits_come_back_as_views_of_llama_cpp_memory(tiny):
    with make_engine(tiny.base) as e:
        seq = e.new_sequence()
        e.advance([seq], [prompt(e)])
        view = e.base.decode([(seq.seq_id, [42], len(seq.tokens))])
        assert not view.flags.owndata
        ptr = llama_cpp.llama_get_logits_ith(e.base.ptr, -1)
        assert view.ctypes.data == ctypes.addressof(ptr.contents)


def test_one_decode_returns_the_logits_of_several_positions(tiny):
    """score() feeds a continuation at once and returns the guided rows after each token, as
    feeding it one token at a time does; the output buffer holds only what is asked."""
    settings = ContextSettings(n_ctx=256, exact=True, n_logits=6)
    config = EngineConfig(tiny.base, [ArmSpec(tiny.lora, 0.7)], settings)
    with Engine.load(config) as e:
        ids = prompt(e)
        cont = e.model.tokenize(" and the sea is calm", add_special=False)[:6]
        seq = e.new_sequence()
        e.advance([seq], [ids])
        rows = e.score(seq, cont)
        assert rows.shape == (len(cont), e.n_vocab)
        e.release(seq)
        one = e.new_sequence()
        e.advance([one], [ids])
        singly = [np.array(e.advance([one], [[t]])) for t in cont]
    np.testing.assert_allclose(rows, np.stack(singly), atol=1e-4)


def test_score_reads_more_rows_than_one_decode_returns_in_pieces(tiny):
    """A context made for one row per decode (one sequence, no drafts) scores 12 tokens in
    pieces, each row as a one-token step gives it, instead of llama.cpp aborting the
    process on more outputs than it reserved."""
    settings = ContextSettings(n_ctx=64, n_seq_max=1, exact=True)
    tokens = [1, 378, 1300, 314, 17, 9, 3000, 42, 7, 504, 3458, 282]
    with Engine.load(EngineConfig(tiny.base, [ArmSpec(tiny.lora, 1.0, "lora")], settings)) as e:
        seq = e.new_sequence()
        scored = e.score(seq, tokens)
        e.release(seq)
        seq = e.new_sequence()
        stepped = np.stack([np.array(e.advance([seq], [[t]])) for t in tokens])
    assert scored.shape == (12, e.n_vocab)
    np.testing.assert_allclose(scored, stepped, rtol=0, atol=1e-4)


def test_decode_batches_keep_to_n_batch_tokens_and_the_outputs_reserved():
    """Context.decode's packing: every entry once, in order; no batch over n_batch tokens or
    over the outputs the context reserved (llama.cpp would abort the process)."""
    flat = [(t % 2, t, t // 2, t % 3 == 0) for t in range(40)]
    for n_batch, most in ((8, 2), (5, 10), (64, 1), (1, 1)):
        chunks = list(_chunks(flat, n_batch, most))
        assert [e for c in chunks for e in c] == flat
        assert all(0 < len(c) <= n_batch and sum(e[3] for e in c) <= most for c in chunks)
    assert [len(c) for c in _chunks(flat, 64, 1)] == [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 1]
