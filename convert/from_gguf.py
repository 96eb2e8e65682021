"""A GGUF llama model back to a Hugging Face checkpoint (dequantized, float32).

Contract: `gguf_to_hf(gguf_path, out_dir)` writes config.json and model.safetensors that
transformers loads as LlamaForCausalLM, with the very weights llama.cpp runs (quantized types
are dequantized by gguf-py). It is how tests and benchmarks get a real trained model in PyTorch
form without a download, and how training starts from a GGUF base.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from edge_genarm.errors import ConversionError

from .archs import ARCHS


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of archs.permute_rows: interleaved pairs back to two halves per head."""
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, head_dim // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _hf_names(n_layer: int) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    per_layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                 "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]
    return names + [f"model.layers.{i}.{p}.weight" for i in range(n_layer) for p in per_layer]


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    if meta.get("general.architecture") != "llama":
        raise ConversionError(f"{gguf_path}: only llama GGUFs convert back to PyTorch for now")
    n_layer, n_head = meta["llama.block_count"], meta["llama.attention.head_count"]
    n_head_kv = meta.get("llama.attention.head_count_kv", n_head)
    names = gguf.get_tensor_name_map(ARCHS["LlamaForCausalLM"].gguf_arch, n_layer)
    to_hf = {names.get_name(h, try_suffixes=(".weight",)): h for h in _hf_names(n_layer)}
    weights = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape(tuple(reversed([int(d) for d in t.shape])))
        hf_name = to_hf.get(t.name)
        if hf_name is None:
            raise ConversionError(f"{gguf_path}: no Hugging Face name for {t.name}")
        if hf_name.endswith("q_proj.weight"):
            data = unpermute_rows(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = unpermute_rows(data, n_head_kv)
        weights[hf_name] = torch.from_numpy(np.ascontiguousarray(data))
    n_vocab, n_embd = weights["model.embed_tokens.weight"].shape
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(n_vocab), "hidden_size": int(n_embd),
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(n_layer), "num_attention_heads": int(n_head),
        "num_key_value_heads": int(n_head_kv),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in weights, "torch_dtype": "float32",
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
