"""PARGS against a plain reference loop written on llama-cpp-python's own API.

The reference uses none of edge-genarm's engine, scheduler, reward or llama modules. It runs
SmolLM2 with F32 weights (the shipped Q4_1 dequantized by llama.cpp's own quantizer) and an F32 KV
cache, flash attention off (what `--exact` sets), and the shipped demo reward model
`@demo-positive-rm` (a LoRA of SmolLM2 whose GGUF metadata holds the head):

- the base is a `llama_cpp.Llama` (logits_all=False); after each `eval` the last position's
  logits come from `llama_get_logits_ith(ctx, -1)` and become log-probs (float64, T = 1);
- the candidates are the k = 10 best log-probs (ties: the lower id), by a stable argsort;
- the reward model is a second `Llama` on the same F32 file with the LoRA (`lora_path`),
  `embedding=True` and `pooling_type=LLAMA_POOLING_TYPE_NONE`; it holds prompt + answer so far
  in its cache, and each candidate is fed alone after it (one one-token decode per candidate, as
  the PARGS authors' code does) and taken back off; `llama_get_embeddings_ith(ctx, -1)` is the
  final-norm hidden state of prompt + answer + candidate, and r = hidden . weight + bias with the
  head read from the adapter's metadata by `gguf` (float64);
- the token is the candidate of highest log-prob + w * r; the answer ends at an end-of-generation
  token or after N_TOKENS.

The prompt is SmolLM2's chat template written out as text (no BOS: the template has none),
tokenized by llama-cpp-python with special tokens parsed.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner

from edge_genarm.cli import main
from edge_genarm.registry import resolve_model
from reference import reference_llama

N_CTX = 256
K = 10           # --candidates' default
N_TOKENS = 14
PROMPT = "Tell me about a rainy afternoon."
TEMPLATE = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
# F32 weights and cache: the engine's batched rows (k candidates in one decode) and the
# reference's one-row decodes differ by about 1e-6 (measured: log-probs 4e-7, rewards 2e-6 over
# the w = 1 answer); a choice closer than this is a near-tie either side may take
NEAR_TIE = 1e-4


@dataclass
class Step:
    candidates: np.ndarray  # the base's top k, best first
    logprobs: np.ndarray    # theirs, float64
    rewards: np.ndarray     # r(prompt + answer so far + candidate), float64
    token: int              # the candidate of highest logprob + w * r

    def total(self, token: int, weight: float) -> float:
        j = int(np.flatnonzero(self.candidates == token)[0])
        return float(self.logprobs[j] + weight * self.rewards[j])


class Reference:
    """Base and reward model as two llama-cpp-python `Llama`s, PARGS-G by hand."""

    def __init__(self, model: Path, reward_model: Path):
        threads = len(os.sched_getaffinity(0))  # the engine's default: every core
        exact = dict(n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                     type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                     flash_attn=False, verbose=False)
        # n_batch as the engine's contexts have it: min(512, n_ctx) for the base, 64 (at least
        # n_seq x k candidate rows) for the reward model
        self.base = reference_llama(model, logits_all=False, n_batch=N_CTX, n_ubatch=N_CTX,
                                    **exact)
        self.rm = reference_llama(model, lora_path=str(reward_model), embedding=True,
                                  pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, n_batch=64,
                                  n_ubatch=64, **exact)
        fields = gguf.GGUFReader(reward_model).fields
        self.weight = np.asarray(fields["reward.head.weight"].contents(), dtype=np.float64)
        self.bias = float(fields["reward.head.bias"].contents())
        assert self.weight.shape == (self.rm.n_embd(),)
        self.vocab = llama_cpp.llama_model_get_vocab(self.base.model)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.base.tokenize(TEMPLATE.format(prompt).encode(), add_bos=False, special=True)

    def logprobs(self) -> np.ndarray:
        row = llama_cpp.llama_get_logits_ith(self.base.ctx, -1)
        logits = np.ctypeslib.as_array(row, shape=(self.base.n_vocab(),)).astype(np.float64)
        m = logits.max()
        return logits - (m + np.log(np.exp(logits - m).sum()))

    def reward_of_next(self, token: int) -> float:
        """r(what the reward model holds + token); the token is taken back off after."""
        held = self.rm.n_tokens
        self.rm.eval([token])
        hidden = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(self.rm.ctx, -1),
                                       shape=(self.rm.n_embd(),)).astype(np.float64)
        self.rm.n_tokens = held  # the next eval drops the candidate's cell
        return float(hidden @ self.weight + self.bias)

    def pargs_greedy(self, prompt_ids: list[int], weight: float, n_tokens: int) -> list[Step]:
        self.base.reset()
        self.rm.reset()
        self.base.eval(prompt_ids)
        self.rm.eval(prompt_ids)
        steps = []
        for _ in range(n_tokens):
            logprobs = self.logprobs()
            candidates = np.argsort(-logprobs, kind="stable")[:K]
            rewards = np.array([self.reward_of_next(int(c)) for c in candidates])
            token = int(candidates[np.argmax(logprobs[candidates] + weight * rewards)])
            steps.append(Step(candidates, logprobs[candidates], rewards, token))
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            self.base.eval([token])
            self.rm.eval([token])
        return steps

    def close(self) -> None:
        self.base.close()
        self.rm.close()


@pytest.fixture(scope="module")
def smollm2_f32(smollm2, tmp_path_factory) -> Path:
    """The shipped Q4_1 SmolLM2 dequantized to F32 by llama.cpp's own quantizer."""
    out = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = len(os.sched_getaffinity(0))
    assert llama_cpp.llama_model_quantize(str(smollm2).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == \
        {gguf.GGMLQuantizationType.F32}
    return out


@pytest.fixture(scope="module")
def demo_rm() -> Path:
    return resolve_model("@demo-positive-rm")


@pytest.fixture(scope="module")
def reference(smollm2_f32, demo_rm):
    ref = Reference(smollm2_f32, demo_rm)
    ref.answers = {}  # weight -> steps, each answer computed once for the tests below
    yield ref
    ref.close()


def reference_answer(reference, weight: float) -> list[Step]:
    if weight not in reference.answers:
        reference.answers[weight] = reference.pargs_greedy(reference.prompt_ids(PROMPT), weight,
                                                           N_TOKENS)
    return reference.answers[weight]


def generate_json(*args) -> dict:
    res = CliRunner().invoke(main, ["generate", "--json", *map(str, args)])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def assert_same_up_to_a_near_tie(ours: list[int], steps: list[Step], weight: float) -> None:
    """The engine's tokens are the reference's, or the same up to a step where the two picks'
    scores are within NEAR_TIE in the reference (after which the answers go their own ways)."""
    theirs = [s.token for s in steps]
    if ours == theirs:
        return
    d = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert d is not None, f"one answer is the other's prefix: {ours} vs {theirs}"
    step = steps[d]
    assert ours[d] in step.candidates, (d, ours[d], step.candidates)  # not from another top k
    gap = step.total(theirs[d], weight) - step.total(ours[d], weight)
    assert gap < NEAR_TIE, (f"w {weight}: step {d} took {ours[d]}, the reference {theirs[d]} "
                            f"by {gap:.3g} (not a near-tie)")


@pytest.mark.parametrize("weight", [0.5, 1.0, 2.0])
def test_pargs_greedy_through_the_cli_equals_the_reference_loop(smollm2_f32, reference, weight):
    """`generate --method pargs --greedy --exact` with the demo reward model, token for token
    the reference's answer; and the reward moved it: some token is not the base's top one."""
    out = generate_json("--base", smollm2_f32, "--reward-model", "@demo-positive-rm",
                        "--method", "pargs", "--reward-weight", weight, "--candidates", K,
                        "--greedy", "--exact", "-c", N_CTX, "-n", N_TOKENS, PROMPT)
    assert (out["method"], out["reward_weight"], out["candidates"]) == ("pargs", weight, K)
    assert out["prompt_ids"] == reference.prompt_ids(PROMPT)
    steps = reference_answer(reference, weight)
    assert_same_up_to_a_near_tie(out["tokens"], steps, weight)
    assert any(s.token != s.candidates[0] for s in steps)


def test_the_engine_scores_each_step_as_the_reference_does(smollm2_f32, demo_rm, reference):
    """Replaying the reference's w = 1 answer through the engine as the scheduler steps it (the
    base's row, its top k, the reward model's candidates in one batched decode, the chosen one
    kept): the same top k in the same order, log-probs and rewards within 1e-5. The bias and the
    head's scale, which no greedy choice can show, are checked here."""
    from edge_genarm.engine import Engine, EngineConfig, RewardSpec
    from edge_genarm.guidance import log_softmax
    from edge_genarm.llama import ContextSettings
    from edge_genarm.reward import top_candidates

    steps = reference_answer(reference, 1.0)
    config = EngineConfig(smollm2_f32, [], ContextSettings(n_ctx=N_CTX, exact=True),
                          reward=RewardSpec(demo_rm, K))
    with Engine.load(config) as engine:
        seq = engine.new_sequence()
        new = reference.prompt_ids(PROMPT)
        for step in steps:
            logprobs = log_softmax(engine.step([seq], [new], np.zeros((1, 0)))[0])
            candidates = top_candidates(logprobs, K)
            assert candidates.tolist() == step.candidates.tolist()
            rewards = engine.candidate_rewards([seq], [candidates])[0]
            assert np.abs(logprobs[candidates] - step.logprobs).max() < 1e-5
            assert np.abs(rewards - step.rewards).max() < 1e-5
            new = [step.token]
    # the rewards spread over the candidates: a head read wrongly would not pass by chance
    assert max(np.ptp(s.rewards) for s in steps) > 0.5
