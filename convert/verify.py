"""A converted GGUF checked against its PyTorch checkpoint on a few probe prompts.

Contract: `verify(...)` tokenizes the probes with the GGUF's own tokenizer, feeds the same ids to
llama.cpp (through edge-genarm's adapter, F32 KV cache, flash attention off) and to transformers
(float32, with the LoRA merged in for an adapter), and returns the largest absolute difference
of next-token log-probabilities over every position and token, and the top-1 agreement.
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
# About ten times what the tests measure on tiny random models; llama.cpp's K-quants are
# reported, never failed: how much they may move a model is the user's call.
TOLERANCE = {"f32": 1e-3, "f16": 2e-2, "bf16": 1e-1, "q8_0": 2e-1}


@dataclass
class Report:
    max_abs_diff: float
    top1_agreement: float
    positions: int

    def line(self) -> str:
        return (f"verify: {self.positions} positions, largest |log-prob difference| "
                f"{self.max_abs_diff:.2e}, top-1 agreement {100 * self.top1_agreement:.1f}%")


def gguf_logprobs(model_path: Path, ids: list[int], adapter_path: Path | None = None):
    model = Model(model_path)
    try:
        adapter = LoraAdapter(model, adapter_path) if adapter_path else None
        ctx = Context(model, ContextSettings(n_ctx=max(64, len(ids) + 8), exact=True), adapter)
        rows = [np.array(ctx.decode([(0, [tok], pos)])[0]) for pos, tok in enumerate(ids)]
        ctx.close()
        return model, guidance.log_softmax(np.stack(rows))
    finally:
        model.close()


def torch_logprobs(model_dir: Path, ids: list[int], adapter=None) -> np.ndarray:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        with torch.no_grad():
            for module in adapter.modules:
                a, b, scale = adapter.factors(module)
                layer = model.get_submodule(module.removeprefix("base_model.model."))
                layer.weight += torch.from_numpy(scale * (b @ a))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return guidance.log_softmax(logits)


def verify(gguf_path: Path, torch_dir: Path, adapter=None, base_gguf: Path | None = None,
           probes=PROBES) -> Report:
    """gguf_path: the converted model, or (with base_gguf) the converted adapter."""
    model_path = base_gguf or gguf_path
    worst, agree, total = 0.0, 0, 0
    for text in probes:
        tok_model = Model(model_path)
        ids = tok_model.tokenize(text, add_special=True)
        tok_model.close()
        _, ours = gguf_logprobs(model_path, ids, gguf_path if base_gguf else None)
        ref = torch_logprobs(torch_dir, ids, adapter)
        n = min(ours.shape[1], ref.shape[1])
        worst = max(worst, float(np.max(np.abs(ours[:, :n] - ref[:, :n]))))
        agree += int(np.sum(np.argmax(ours[:, :n], 1) == np.argmax(ref[:, :n], 1)))
        total += len(ids)
    return Report(worst, agree / total, total)
