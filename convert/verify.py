"""A converted GGUF checked against its PyTorch checkpoint on a few probe prompts.

Contract: `verify(...)` tokenizes the probes with the GGUF's own tokenizer, feeds the same ids to
llama.cpp (through edge-genarm's adapter, F32 KV cache, flash attention off) and to transformers
(float32; for an adapter, PEFT's own PeftModel when peft is installed, so that the converter's
LoRA scales are checked against PEFT's, else the LoRA merged in by hand), and reports, over
every position, the largest absolute difference of next-token log-probabilities over all tokens,
the same over the tokens PyTorch gives at least 1e-4 (those a sampler can pick: far-tail
log-probs near -30 move most under rounding and matter least), and the top-1 agreement.
Tolerances apply to the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_genarm import guidance
from edge_genarm.llama import Context, ContextSettings, LoraAdapter, Model

PROBES = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 12 times 7?\nA:",
)

# Largest log-prob difference accepted, by storage type (see the README for measured figures).
# For the likely-token difference: f32 at 1e-3, as for any float32 port; the others about
# 2.5 times what benchmarks/bench_convert.py measures on the real SmolLM2 (small models are
# the touchy ones).
# A conversion bug (a lost permutation, a wrong LoRA scale) moves log-probs by whole nats and
# breaks top-1 agreement, hence the floor on that too. llama.cpp's K-quants are reported,
# never failed: how far they may move a model is the user's call.
TOLERANCE = {"f32": 1e-3, "f16": 5e-2, "bf16": 6e-1, "q8_0": 2.5}
MIN_TOP1 = 0.9
LIKELY = np.log(1e-4)


@dataclass
class Report:
    max_abs_diff: float     # over every token
    likely_abs_diff: float  # over the tokens PyTorch gives at least 1e-4
    top1_agreement: float
    positions: int

    def line(self) -> str:
        return (f"verify: {self.positions} positions, largest |log-prob difference| "
                f"{self.max_abs_diff:.2e} (tokens with p >= 1e-4: {self.likely_abs_diff:.2e}), "
                f"top-1 agreement {100 * self.top1_agreement:.1f}%")


def _llama_logprobs(model: Model, adapter: LoraAdapter | None, ids: list[int]) -> np.ndarray:
    ctx = Context(model, ContextSettings(n_ctx=max(64, len(ids) + 8), exact=True), adapter)
    try:
        rows = [np.array(ctx.decode([(0, [tok], pos)])[0]) for pos, tok in enumerate(ids)]
    finally:
        ctx.close()
    return guidance.log_softmax(np.stack(rows))


def load_torch(model_dir: Path, adapter=None):
    """The checkpoint in float32 PyTorch, with a PEFT LoRA applied by PEFT itself when it is
    installed, else merged in by hand with the converter's own scales."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is None:
        return model
    try:
        import peft
    except ImportError:
        pass
    else:
        return peft.PeftModel.from_pretrained(model, adapter.dir).eval()
    with torch.no_grad():
        for module in adapter.modules:
            a, b, scale = adapter.factors(module)
            layer = model.get_submodule(module.removeprefix("base_model.model."))
            layer.weight += torch.from_numpy(scale * (b @ a))
    return model


def _torch_logprobs(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return guidance.log_softmax(logits)


def torch_logprobs(model_dir: Path, ids: list[int], adapter=None) -> np.ndarray:
    return _torch_logprobs(load_torch(model_dir, adapter), ids)


def verify(gguf_path: Path, torch_dir: Path, adapter=None, base_gguf: Path | None = None,
           probes=PROBES) -> Report:
    """gguf_path: the converted model, or (with base_gguf) the converted adapter."""
    model = Model(base_gguf or gguf_path)
    try:
        lora = LoraAdapter(model, gguf_path) if base_gguf else None
        reference = load_torch(torch_dir, adapter)
        worst, likely, agree, total = 0.0, 0.0, 0, 0
        for text in probes:
            ids = model.tokenize(text, add_special=True)
            ours, ref = _llama_logprobs(model, lora, ids), _torch_logprobs(reference, ids)
            n = min(ours.shape[1], ref.shape[1])
            diff = np.abs(ours[:, :n] - ref[:, :n])
            worst = max(worst, float(diff.max()))
            likely = max(likely, float(diff[ref[:, :n] >= LIKELY].max()))
            agree += int(np.sum(np.argmax(ours[:, :n], 1) == np.argmax(ref[:, :n], 1)))
            total += len(ids)
    finally:
        model.close()
    return Report(worst, likely, agree / total, total)
