"""Weak to strong on the real models: Qwen2.5-Coder-1.5B-Instruct guided by the whole
Qwen2.5-Coder-0.5B-Instruct as a full-model ARM (both joined from their PyPI parts)."""

from __future__ import annotations

from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.generation import encode_prompt, generate
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import Registry
from edge_genarm.sampling import SamplingSettings
from edge_genarm.scheduler import Request, Scheduler


def test_the_small_coder_guides_the_large_one():
    reg = Registry.load()
    base, arm = reg.resolve("@qwen-coder-1.5b"), reg.resolve("@qwen-coder-0.5b")
    config = EngineConfig(base, [ArmSpec(arm, 1.0, "small")], ContextSettings(n_ctx=256,
                                                                              n_seq_max=2))
    with Engine.load(config) as engine:  # one tokenizer: loads without refusal
        assert engine.n_vocab == 151936 and engine.arms[0].kind == "model"
        ids = tuple(encode_prompt(engine, "Write a Python function that reverses a string."))
        with Scheduler(engine) as scheduler:
            answers = {}
            for weight in (0.0, 1.0):
                request = Request(ids, SamplingSettings(greedy=True), max_tokens=24,
                                  arms={"small": weight})
                answers[weight] = generate(scheduler, scheduler.submit(request))
    assert answers[0.0].text and answers[1.0].text
    assert answers[0.0].tokens != answers[1.0].tokens
    assert answers[1.0].alphas == {"small": 1.0}
