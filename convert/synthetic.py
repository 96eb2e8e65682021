"""Random LoRA adapters for tests and benchmarks, where no trained adapter can be downloaded.

Contract: `random_lora_pairs(shapes, ...)` returns {tensor name: (A (r, in), B (out, r))} for the
weights whose names contain one of `targets`; B is non-zero, so the adapter changes the outputs.
`shapes` maps GGUF tensor names to NumPy (out, in) shapes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

DEFAULT_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def random_lora_pairs(shapes: Mapping[str, tuple[int, int]], rank: int = 8, seed: int = 0,
                      targets=DEFAULT_TARGETS, gain: float = 0.5
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and any(f".{t}.weight" in name for t in targets):
            out, inp = shape
            a = (rng.normal(size=(rank, inp)) / np.sqrt(inp)).astype(np.float32)
            b = (rng.normal(size=(out, rank)) * gain / np.sqrt(rank)).astype(np.float32)
            pairs[name] = (a, b)
    return pairs
