"""A GGUF llama or qwen2 model back to a Hugging Face checkpoint (dequantized, float32).

Contract: `gguf_to_hf(gguf_path, out_dir, adapter=None)` writes config.json and
model.safetensors that transformers loads as LlamaForCausalLM or Qwen2ForCausalLM (with the q/k/v
biases), with the very weights llama.cpp runs (quantized types are dequantized by gguf-py); a
LoRA adapter GGUF of that model, when given, is merged in as llama.cpp applies it
(W + alpha / r * B @ A). It is how tests and benchmarks get a real trained model in PyTorch
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


# GGUF architecture -> the Hugging Face class that runs it
HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _hf_names(n_layer: int, qkv_bias: bool) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight",
                 "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight"]
    if qkv_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    return names + [f"model.layers.{i}.{p}" for i in range(n_layer) for p in per_layer]


def _lora_deltas(path: Path, architecture: str) -> dict[str, np.ndarray]:
    """GGUF tensor name -> alpha / r * B @ A of a LoRA adapter GGUF, in the GGUF's own layout."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise ConversionError(f"{path} is not a LoRA adapter GGUF")
    if fields.get("general.architecture") != architecture:
        raise ConversionError(f"the adapter {path} is for {fields.get('general.architecture')!r}"
                              f" but the model is {architecture!r}")
    factors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        target, _, part = t.name.rpartition(".")
        factors.setdefault(target, {})[part] = data.reshape(tuple(reversed(
            [int(d) for d in t.shape])))
    alpha = float(fields["adapter.lora.alpha"])
    return {target: (alpha / f["lora_a"].shape[0]) * (f["lora_b"] @ f["lora_a"])
            for target, f in factors.items()}


def _weights(reader, arch, n_layer: int, n_head: int, n_head_kv: int, path,
             deltas: dict[str, np.ndarray]) -> dict:
    """Every tensor dequantized to float32 under its Hugging Face name, an adapter's delta
    added; q and k rows put back in Hugging Face's rotary layout where the converter reordered
    them."""
    import torch

    names = gguf.get_tensor_name_map(arch.gguf_arch, n_layer)
    to_hf = {names.get_name(hf, try_suffixes=(".weight", ".bias")): hf
             for hf in _hf_names(n_layer, arch.qkv_bias)}
    weights = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape(tuple(reversed([int(d) for d in t.shape])))
        if t.name in deltas:
            delta = deltas.pop(t.name)
            if delta.shape != data.shape:
                raise ConversionError(f"the adapter's {t.name} is {delta.shape}, the model's "
                                      f"is {data.shape}: the adapter is for another model")
            data = (data + delta).astype(np.float32)
        hf_name = to_hf.get(t.name)
        if hf_name is None:
            raise ConversionError(f"{path}: no Hugging Face name for {t.name}")
        if arch.permute_qk and ".q_proj." in hf_name:
            data = unpermute_rows(data, n_head)
        elif arch.permute_qk and ".k_proj." in hf_name:
            data = unpermute_rows(data, n_head_kv)
        weights[hf_name] = torch.from_numpy(np.ascontiguousarray(data))
    if deltas:
        raise ConversionError(f"the adapter adapts {', '.join(sorted(deltas))}, which {path} "
                              "does not have")
    return weights


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path,
               adapter: str | Path | None = None) -> Path:
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    name = meta.get("general.architecture")
    if name not in HF_CLASS:
        raise ConversionError(f"{gguf_path}: a {name} GGUF does not convert back to PyTorch; "
                              f"the architectures that do: {', '.join(HF_CLASS)}")
    arch = ARCHS[HF_CLASS[name]]
    n_layer, n_head = meta[f"{name}.block_count"], meta[f"{name}.attention.head_count"]
    n_head_kv = meta.get(f"{name}.attention.head_count_kv", n_head)
    deltas = _lora_deltas(Path(adapter), name) if adapter is not None else {}
    weights = _weights(reader, arch, n_layer, n_head, n_head_kv, gguf_path, deltas)
    n_vocab, n_embd = weights["model.embed_tokens.weight"].shape
    config = {
        "architectures": [HF_CLASS[name]], "model_type": name,
        "vocab_size": int(n_vocab), "hidden_size": int(n_embd),
        "intermediate_size": int(meta[f"{name}.feed_forward_length"]),
        "num_hidden_layers": int(n_layer), "num_attention_heads": int(n_head),
        "num_key_value_heads": int(n_head_kv),
        "max_position_embeddings": int(meta[f"{name}.context_length"]),
        "rms_norm_eps": float(meta[f"{name}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get(f"{name}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in weights, "torch_dtype": "float32",
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
