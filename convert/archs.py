"""The architectures the converter knows, as a data table.

Each entry says which GGUF architecture a Hugging Face `architectures[0]` becomes and whether
llama.cpp wants the rows of q_proj and k_proj reordered for its rotary layout (llama.cpp's llama
graph rotates interleaved pairs; Hugging Face's Llama rotates the two halves of each head).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool
    qkv_bias: bool = False

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHS = {
    "LlamaForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN2, permute_qk=False, qkv_bias=True),
}

# Buffers some checkpoints carry that are recomputed at load time, never weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of each head from [first half, second half] to interleaved pairs.

    Applies to a q or k weight (out, in), a bias (out,), or a LoRA B (out, r) alike.
    """
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))
