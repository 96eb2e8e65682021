"""Scalar reward models: the head in GGUF against transformers, candidates forked and scored in
one decode, the tokenwise methods' maths on small arrays, PARGS through the scheduler, and the
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_genarm.cli import main
from edge_genarm.convert.gguf_out import with_reward_head
from edge_genarm.engine import ArmSpec, Engine, EngineConfig, RewardSpec
from edge_genarm.errors import IncompatibleModelsError, ModelFileError, UserError
from edge_genarm.gguf_file import inspect_gguf
from edge_genarm.llama import ContextSettings
from edge_genarm.reward import read_head, tokenwise_scores, top_candidates
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler
from conftest import n_embd
from hf_models import write_smollm2_tokenizer, write_tiny_hf_model

PROMPTS = ([1, 504, 3458, 6357, 282, 260, 2103, 30], [1, 378, 1300, 314], [1, 17, 9, 3000, 42, 7])


def load(base, reward, k=4, n_seq=2, adapter=None, arms=()):
    settings = ContextSettings(n_ctx=128, n_seq_max=n_seq, exact=True)
    return Engine.load(EngineConfig(Path(base), list(arms), settings,
                                    reward=RewardSpec(reward, k, adapter)))


# -- pure maths -------------------------------------------------------------------------------

def test_tokenwise_scores_keep_only_the_candidates():
    scores = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    out = tokenwise_scores(scores, np.array([3, 1]), np.array([-1.0, 2.0]), 0.5)
    assert out[0] == -np.inf and out[2] == -np.inf
    assert out[3] == pytest.approx(np.log(0.4) - 0.5) and out[1] == pytest.approx(np.log(0.2) + 1)
    # w = 0: the base's own order among the candidates
    assert tokenwise_scores(scores, np.array([3, 1]), np.array([9.0, 0.0]), 0).argmax() == 3


def test_top_candidates_are_the_best_first_ties_by_id():
    scores = np.array([0.5, 2.0, -1.0, 2.0, 1.0], dtype=np.float32)
    assert top_candidates(scores, 3).tolist() == [1, 3, 4]
    assert top_candidates(scores, 9).tolist() == [1, 3, 4, 0, 2]


# -- the head in GGUF ---------------------------------------------------------------------------

def test_the_head_round_trips_through_gguf(rm):
    head = read_head(rm["lora"])
    weight, bias = rm["head"]
    assert np.array_equal(head.weight, weight) and head.bias == bias
    assert head.objective == "partial-bt"
    # the copy keeps the adapter as it was: it still attaches to the base
    assert inspect_gguf(rm["lora"]).is_adapter


def test_the_reward_is_what_a_transformers_score_head_gives(tmp_path, smollm2):
    """A tiny llama in transformers as LlamaForSequenceClassification (num_labels = 1, its
    score weight = the head) against the same checkpoint converted to GGUF with that head: the
    last token's final-norm hidden state through the head, within 1e-3 in f32."""
    import torch
    import transformers as tf

    tok = write_smollm2_tokenizer(smollm2, tmp_path / "tok")
    hf_dir = write_tiny_hf_model(tmp_path / "llama", "llama", tok, seed=11)
    res = CliRunner().invoke(main, ["convert", str(hf_dir), "--out", str(tmp_path / "m.gguf"),
                                    "--outtype", "f32"])
    assert res.exit_code == 0, res.stderr
    weight = np.random.default_rng(4).normal(0, 1, 64).astype(np.float32)
    path = with_reward_head(tmp_path / "m.gguf", tmp_path / "rm.gguf", weight, 0.0, "full-bt")
    clf = tf.LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=1,
                                                            dtype=torch.float32)
    with torch.no_grad():
        clf.score.weight.copy_(torch.from_numpy(weight)[None])
    with load(path, path, k=1, n_seq=len(PROMPTS)) as engine:
        seqs = [engine.new_sequence() for _ in PROMPTS]
        for seq, ids in zip(seqs, PROMPTS):
            engine.extend(seq, list(ids))
        ours = engine.sequence_rewards(seqs)
    with torch.no_grad():
        theirs = [float(clf(torch.tensor([ids])).logits[0, 0]) for ids in PROMPTS]
    assert np.abs(ours - np.array(theirs)).max() < 1e-3
    assert np.ptp(theirs) > 0.1  # the prompts score apart: the check can fail


# -- candidates -----------------------------------------------------------------------------

def test_candidates_score_as_each_sequence_decoded_whole(tiny, rm):
    """Every candidate's reward equals r of prefix + candidate decoded directly; the candidate a
    sequence goes on with is kept as its next cell, and its next candidates still score as if
    decoded whole; the others are freed."""
    cands = [np.array([5, 900, 31, 7]), np.array([12, 40])]
    with load(tiny.base, rm["lora"]) as engine:
        rmodel, ctx = engine.reward, engine.reward_context
        seqs = [engine.new_sequence() for _ in PROMPTS[:2]]
        for seq, ids in zip(seqs, PROMPTS):
            engine.extend(seq, list(ids))
        first = engine.candidate_rewards(seqs, cands)
        decoded = ctx.n_decoded
        engine.extend(seqs[0], [900])   # the sequences go on with a candidate...
        engine.extend(seqs[1], [12])
        nxt = [np.array([3, 4]), np.array([8])]
        second = engine.candidate_rewards(seqs, nxt)
        assert ctx.n_decoded - decoded == 3  # ...which is not decoded again
        for seq in seqs:
            engine.release(seq)
        assert all(ctx.seq_end(rmodel.candidate_id(s, j)) == 0
                   for s in range(2) for j in range(4))
        assert all(ctx.seq_end(s) == 0 for s in range(2))
    with load(tiny.base, rm["lora"], k=1, n_seq=1) as engine:
        def whole(tokens):
            seq = engine.new_sequence()
            engine.extend(seq, list(tokens))
            r = float(engine.sequence_rewards([seq])[0])
            engine.release(seq)
            return r
        for ids, c, got in zip(PROMPTS, cands, first):
            assert got == pytest.approx([whole(ids + [int(t)]) for t in c], abs=1e-4)
        assert second[0] == pytest.approx([whole(PROMPTS[0] + [900, t]) for t in (3, 4)],
                                          abs=1e-4)
        assert second[1] == pytest.approx([whole(PROMPTS[1] + [12, 8])], abs=1e-4)


def test_a_lora_reward_model_scores_as_the_merged_model(tiny, rm):
    cands = [np.array([5, 900, 31])]
    results = []
    for reward in (rm["lora"], rm["merged"]):
        with load(tiny.base, reward, k=3, n_seq=1) as engine:
            seq = engine.new_sequence()
            engine.extend(seq, list(PROMPTS[0]))
            results.append(engine.candidate_rewards([seq], cands)[0])
    assert results[0] == pytest.approx(results[1], abs=1e-3)


# -- through the scheduler ----------------------------------------------------------------------

def answer(engine, **request):
    with Scheduler(engine) as scheduler:
        h = scheduler.submit(Request(tuple(PROMPTS[0]), SamplingSettings(greedy=True), 24,
                                     **request))
        return [e.token for e in scheduler.run([h]) if e.token is not None]


def test_pargs_g_at_weight_0_is_greedy_decoding_of_the_base(tiny, rm):
    with load(tiny.base, rm["lora"]) as engine:
        greedy = answer(engine)
        assert answer(engine, method="pargs", reward_weight=0.0) == greedy
        assert answer(engine, method="args", reward_weight=0.0) == greedy
        guided = answer(engine, method="pargs", reward_weight=50.0)
    assert guided != greedy


def test_pargs_at_a_large_weight_takes_the_candidate_of_highest_reward(tiny, rm):
    """Replayed step by step: each token is, of the base's top 4 after its prefix, the one the
    reward model scores highest (the weight drowns the base's log-probs)."""
    with load(tiny.base, rm["lora"], k=4, n_seq=1) as engine:
        tokens = answer(engine, method="pargs", reward_weight=1e4, candidates=4)
        for t, token in enumerate(tokens[:8]):
            seq = engine.new_sequence()
            row = engine.step([seq], [PROMPTS[0] + tokens[:t]], np.zeros((1, 0)))[0]
            cands = top_candidates(row, 4)  # log_softmax keeps the order: the same top 4
            rewards = engine.candidate_rewards([seq], [cands])[0]
            engine.release(seq)
            assert token == cands[np.argmax(rewards)]


# -- refusals -------------------------------------------------------------------------------

def test_bad_reward_models_and_requests_are_refused_in_one_line(tiny, rm, tmp_path):
    with pytest.raises(ModelFileError, match="has no reward head"):
        load(tiny.base, tiny.lora)
    with pytest.raises(IncompatibleModelsError, match="a reward model must share the base's"):
        load(tiny.base, rm["renamed"])
    with pytest.raises(UserError, match="--candidates must be between 1 and 64, got 0"):
        load(tiny.base, rm["lora"], k=0)
    with pytest.raises(UserError, match="lower --n-parallel or --candidates"):
        load(tiny.base, rm["lora"], k=64, n_seq=8)
    settings = ContextSettings(n_ctx=128)
    with Engine.load(EngineConfig(tiny.base, [], settings)) as engine, Scheduler(engine) as s:
        with pytest.raises(UserError, match="--method pargs needs a reward model: pass "
                                            "--reward-model"):
            s.submit(Request(tuple(PROMPTS[0]), method="pargs"))
    with load(tiny.base, rm["lora"], k=4) as engine, Scheduler(engine) as s:
        with pytest.raises(UserError, match="candidates must be between 1 and 4 .* got 5"):
            s.submit(Request(tuple(PROMPTS[0]), method="pargs", candidates=5))
        with pytest.raises(UserError, match="method must be one of genarm, pargs, args, best-of-n, search, got 'prags'"):
            s.submit(Request(tuple(PROMPTS[0]), method="prags"))


def test_best_of_n_returns_the_sample_the_reward_model_scores_highest(tiny, rm):
    """best-of-n with 3 samples returns exactly one of the 3 answers that n = 3 gives with the
    same seed (answer j samples with seed + j in both), the one of highest reward."""
    sampling = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    with load(tiny.base, rm["lora"], k=1, n_seq=3) as engine:
        with Scheduler(engine) as scheduler:
            h = scheduler.submit(Request(tuple(PROMPTS[1]), sampling, 12, seed=5, n=3))
            answers: dict[int, list[int]] = {}
            for e in scheduler.run([h]):
                if e.token is not None:
                    answers.setdefault(e.index, []).append(e.token)
        with Scheduler(engine) as scheduler:
            h = scheduler.submit(Request(tuple(PROMPTS[1]), sampling, 12, seed=5,
                                         method="best-of-n", samples=3))
            events = list(scheduler.run([h]))
        seqs = [engine.new_sequence() for _ in range(3)]
        for seq, j in zip(seqs, range(3)):
            engine.extend(seq, list(PROMPTS[1]) + answers[j])
        rewards = engine.sequence_rewards(seqs)
    assert len({tuple(a) for a in answers.values()}) == 3  # three different samples
    assert {e.index for e in events} == {0}
    assert [e.token for e in events if e.token is not None] == answers[int(np.argmax(rewards))]
    assert events[-1].usage.finish_reason == "length"


@pytest.fixture(scope="module")
def smollm2_rm(smollm2, smollm2_lora, tmp_path_factory):
    """A reward model on the real SmolLM2: its random LoRA with a random head."""
    weight = np.random.default_rng(2).normal(0, 0.2, n_embd(smollm2)).astype(np.float32)
    return with_reward_head(smollm2_lora, tmp_path_factory.mktemp("srm") / "rm.gguf", weight,
                            0.0, "partial-bt")


def generate(*args):
    res = CliRunner().invoke(main, ["generate", *map(str, args)])
    return res


def generate_json(*args) -> dict:
    res = generate("--json", *args)
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


PROMPT = "Say something about the weather."


def test_each_method_through_the_real_cli_on_smollm2(smollm2, smollm2_rm):
    """PARGS-G at weight 0 is greedy decoding of the base; PARGS at a large weight, ARGS and
    best-of-n run and say how they guided."""
    common = ["--base", smollm2, "--reward-model", smollm2_rm, "-n", 16, "--seed", 3]
    greedy = generate_json("--base", smollm2, "--greedy", "-n", 16, PROMPT)
    assert greedy["method"] == "genarm"
    zero = generate_json(*common, "--method", "pargs", "--reward-weight", 0, "--greedy", PROMPT)
    assert zero["tokens"] == greedy["tokens"]
    assert (zero["method"], zero["reward_weight"], zero["candidates"]) == ("pargs", 0.0, 10)
    pargs = generate_json(*common, "--method", "pargs", "--reward-weight", 100, "--candidates",
                          4, "--greedy", PROMPT)
    assert pargs["tokens"] != greedy["tokens"] and pargs["candidates"] == 4
    args = generate_json(*common, "--method", "args", "--reward-weight", 2, PROMPT)
    assert args["method"] == "args" and args["completion_tokens"] == 16
    best = generate_json(*common, "--method", "best-of-n", "--samples", 3, PROMPT)
    assert (best["method"], best["samples"]) == ("best-of-n", 3)
    assert best["completion_tokens"] == len(best["tokens"]) > 0


def test_args_and_pargs_give_the_same_tokens_with_one_reward_model(tmp_path):
    """ARGS adds w * r to the base's raw logits, PARGS to its log-probs; a log-prob is the logit
    less its row's log-sum-exp, one number for every candidate, so the top k, the argmax and any
    sampling over the candidates (softmax at T, top-k, top-p, min-p) are the same. On the demo
    preset (its one reward model, the partial-BT @demo-positive-rm), three held-out prompts
    decoded together: args and pargs give the same tokens, greedy at w 2 and sampled at w 1 with
    one seed. What tells the methods apart is the reward model each is meant for: args with the
    full-BT @demo-positive-rm-full answers otherwise."""
    held = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "held_out_prompts.txt"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(held.read_text().splitlines(keepends=True)[:3]))

    def tokens(name, *args) -> dict:
        out = tmp_path / f"{name}.jsonl"
        res = CliRunner().invoke(main, ["generate", "--preset", "demo", "-n", "32", "--input",
                                        str(prompts), "--output", str(out), "--n-parallel", "3",
                                        *args])
        assert res.exit_code == 0, res.stderr
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == 3 and all(r["error"] is None for r in records)
        return {r["id"]: r["tokens"] for r in records}

    greedy = ["--greedy", "--reward-weight", "2"]
    pargs = tokens("pargs-greedy", "--method", "pargs", *greedy)
    assert tokens("args-greedy", "--method", "args", *greedy) == pargs
    sampled = ["--seed", "7", "--reward-weight", "1"]
    assert tokens("args-sampled", "--method", "args", *sampled) == \
        tokens("pargs-sampled", "--method", "pargs", *sampled)
    full = tokens("args-full", "--method", "args", "--reward-model", "@demo-positive-rm-full",
                  *greedy)
    assert full != pargs


def test_chat_with_pargs_answers_as_generate_and_saves_the_method(tmp_path):
    """The demo preset names its reward model: chat uses it as generate does, and /save records
    how each reply was guided."""
    args = ["--preset", "demo", "--method", "pargs", "--greedy", "-n", "12"]
    gen = generate(*args, PROMPT)
    assert gen.exit_code == 0, gen.stderr
    path = tmp_path / "chat.json"
    res = CliRunner().invoke(main, ["chat", *args], input=f"{PROMPT}\n/save {path}\n")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == gen.stdout
    reply = [m for m in json.loads(path.read_text())["messages"] if m["role"] == "assistant"]
    assert reply[0]["content"] + "\n" == gen.stdout
    settings = reply[0]["settings"]
    assert (settings["method"], settings["reward_weight"], settings["candidates"]) == (
        "pargs", 4.0, 10)  # the preset's default weight


@pytest.mark.parametrize("args, message", [
    (["--method", "pargs"], "--method pargs needs a reward model: pass --reward-model RM.gguf "
     "(or a preset that names one)"),
    (["--method", "pargs", "--reward-model", "{lora}"], "{lora} has no reward head "
     "(reward.head.weight, reward.head.bias); a reward model is made by `edge-genarm train "
     "--objective partial-bt|full-bt`"),
    (["--method", "pargs", "--reward-model", "{rm}", "--candidates", "0"], "--candidates must "
     "be between 1 and 64, got 0"),
    (["--method", "pargs", "--reward-model", "{rm}", "--candidates", "65"], "--candidates must "
     "be between 1 and 64, got 65"),
    (["--method", "pargs", "--reward-model", "{rm}", "--reward-weight", "nan"], "--reward-weight "
     "must be a finite number, got nan"),
    (["--method", "best-of-n", "--reward-model", "{rm}", "--samples", "0"], "--samples must be "
     ">= 1, got 0"),
    (["--method", "prags"], "Invalid value for '--method': 'prags' is not one of 'genarm', "
     "'pargs', 'args', 'best-of-n', 'search'."),
])
def test_bad_reward_options_are_one_line(smollm2, smollm2_lora, smollm2_rm, args, message):
    args = [a.format(lora=smollm2_lora, rm=smollm2_rm) for a in args]
    res = generate("--base", smollm2, *args, "hi")
    message = message.format(lora=smollm2_lora, rm=smollm2_rm)
    assert res.exit_code == (2 if "Invalid value" in message else 1)
    assert res.stderr.strip().splitlines()[-1].startswith(f"Error: {message}")
    assert "Traceback" not in res.stderr


def test_every_method_in_one_step_answers_as_alone_with_one_reward_decode(tiny, rm):
    """GenARM, PARGS, ARGS with ignore_eos, best-of-n and a penalized request decode side by
    side, each with its own policy: every answer equals the same request alone, and each step
    scores every tokenwise row's candidates in one call of the reward model."""
    sampling = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    greedy = SamplingSettings(greedy=True)
    requests = [
        Request(tuple(PROMPTS[0]), greedy, 8, arms={"lora": 1.5}),
        Request(tuple(PROMPTS[1]), greedy, 8, method="pargs", reward_weight=2.0, candidates=3),
        Request(tuple(PROMPTS[2]), greedy, 8, method="args", ignore_eos=True),
        Request(tuple(PROMPTS[1]), sampling, 6, seed=3, method="best-of-n", samples=2),
        Request(tuple(PROMPTS[2]), SamplingSettings(greedy=True, presence_penalty=1.5), 8,
                arms={"lora": 0.0}),
    ]
    arm = ArmSpec(tiny.lora, 1.0, "lora")
    with load(tiny.base, rm["lora"], k=4, n_seq=6, arms=[arm]) as engine:
        def tokens(scheduler, handles):
            out = {h: [] for h in handles}
            for e in scheduler.run(handles):
                if e.token is not None:
                    out[e.handle].append(e.token)
            return [out[h] for h in handles]

        alone = []
        for request in requests:
            with Scheduler(engine, share_prefixes=False) as scheduler:
                alone += tokens(scheduler, [scheduler.submit(request)])
        calls = []
        score = engine.candidate_rewards
        engine.candidate_rewards = lambda seqs, toks: calls.append(len(seqs)) or score(seqs, toks)
        with Scheduler(engine, share_prefixes=False) as scheduler:
            together = tokens(scheduler, [scheduler.submit(r) for r in requests])
    assert together == alone
    assert all(len(t) == 8 for t in together[:3] + together[4:]) and 1 <= len(together[3]) <= 6
    assert calls[0] == 2 and calls.count(2) >= 7  # PARGS and ARGS rows: one call per step
