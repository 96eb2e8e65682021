"""Tiny llama-architecture GGUF models and LoRA adapters that the tests write themselves.

Random weights, a real vocabulary (borrowed from SmolLM2's GGUF, chat template included), sizes
small enough to write and run in a moment. Weights are scaled so that logits spread over several
units: greedy choices then have clear margins and do not hinge on float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_genarm.convert.gguf_out import PlannedTensor, write_gguf, write_lora_adapter
from edge_genarm.convert.model import HParams, add_hparams
from edge_genarm.convert.synthetic import DEFAULT_TARGETS, random_lora_pairs


@dataclass(frozen=True)
class TinySpec:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 512
    tied: bool = False  # untied output: random tied models repeat their input token
    seed: int = 0
    extra_tokens: int = 0                       # padding tokens appended to the vocabulary
    rename_token: tuple[int, str] | None = None  # (id, new text): a vocabulary that differs
    eos_id: int | None = None                    # another end-of-sequence token
    architecture: str = "llama"


def read_tokenizer(gguf_path: str | Path) -> list[tuple[str, object, list]]:
    """Every tokenizer.* field of a GGUF as (key, value, types), ready to write again."""
    reader = gguf.GGUFReader(gguf_path)
    return [(key, field.contents(), list(field.types)) for key, field in reader.fields.items()
            if key.startswith("tokenizer.")]


def _vocab_fields(tokenizer, spec: TinySpec):
    fields = []
    for key, value, types in tokenizer:
        if key == "tokenizer.ggml.tokens":
            value = list(value) + [f"<pad_{i}>" for i in range(spec.extra_tokens)]
            if spec.rename_token:
                value[spec.rename_token[0]] = spec.rename_token[1]
        elif key == "tokenizer.ggml.token_type":
            value = list(value) + [int(gguf.TokenType.UNUSED)] * spec.extra_tokens
        elif key == "tokenizer.ggml.eos_token_id" and spec.eos_id is not None:
            value = spec.eos_id
        fields.append((key, value, types))
    n_vocab = next(len(v) for k, v, _ in fields if k == "tokenizer.ggml.tokens")
    return fields, n_vocab


def tiny_weights(spec: TinySpec, n_vocab: int) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in NumPy (out, in) order."""
    rng = np.random.default_rng(spec.seed)
    e, hd = spec.n_embd, spec.n_embd // spec.n_head

    def mat(out, inp, gain=1.0):
        return (rng.normal(size=(out, inp)) * gain / np.sqrt(inp)).astype(np.float32)

    w = {"token_embd.weight": rng.normal(size=(n_vocab, e)).astype(np.float32),
         "output_norm.weight": np.ones(e, dtype=np.float32)}
    if not spec.tied:
        w["output.weight"] = mat(n_vocab, e, gain=3.0)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = np.ones(e, dtype=np.float32)
        w[p + "attn_q.weight"] = mat(e, e)
        w[p + "attn_k.weight"] = mat(spec.n_head_kv * hd, e)
        w[p + "attn_v.weight"] = mat(spec.n_head_kv * hd, e)
        w[p + "attn_output.weight"] = mat(e, e)
        w[p + "ffn_norm.weight"] = np.ones(e, dtype=np.float32)
        w[p + "ffn_gate.weight"] = mat(spec.n_ff, e)
        w[p + "ffn_up.weight"] = mat(spec.n_ff, e)
        w[p + "ffn_down.weight"] = mat(e, spec.n_ff)
    return w


def write_tiny_model(path: str | Path, spec: TinySpec, tokenizer,
                     weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny model GGUF; return its weights (random unless given)."""
    fields, n_vocab = _vocab_fields(tokenizer, spec)
    if weights is None:
        weights = tiny_weights(spec, n_vocab)
    arch = spec.architecture

    hp = HParams(n_layer=spec.n_layer, n_embd=spec.n_embd, n_ff=spec.n_ff, n_head=spec.n_head,
                 n_head_kv=spec.n_head_kv, head_dim=spec.n_embd // spec.n_head, n_ctx=spec.n_ctx,
                 rope_theta=10000.0, rms_eps=1e-5, vocab_size=n_vocab, tied=spec.tied)

    def metadata(w: gguf.GGUFWriter) -> None:
        add_hparams(w, hp, "tiny-test-llama", "f32")
        for key, value, types in fields:
            sub = types[1] if types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, types[0], sub_type=sub)

    f32 = gguf.GGMLQuantizationType.F32
    tensors = [PlannedTensor(name, tuple(t.shape), f32, lambda t=t: t) for name, t in weights.items()]
    write_gguf(path, arch, metadata, tensors)
    return weights


def random_lora(weights: dict[str, np.ndarray], rank: int = 4, seed: int = 1,
                targets=DEFAULT_TARGETS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A LoRA with non-zero B on the given projections, big enough to change the outputs."""
    return random_lora_pairs({k: v.shape for k, v in weights.items()}, rank, seed, targets)


def merge_lora(weights, pairs, alpha: float) -> dict[str, np.ndarray]:
    """W + (alpha / r) * B @ A, as llama.cpp applies an adapter at scale 1."""
    merged = dict(weights)
    for name, (a, b) in pairs.items():
        merged[name] = (weights[name] + (alpha / a.shape[0]) * (b @ a)).astype(np.float32)
    return merged


def write_lora(path, pairs, alpha: float, architecture: str = "llama") -> Path:
    return write_lora_adapter(path, architecture, alpha, pairs)

