"""A Hugging Face causal LM checkpoint as a plan of GGUF metadata and tensors.

Contract: `plan_model(checkpoint, tokenizer, outtype)` reads config.json, checks the
architecture against `archs.ARCHS`, maps every weight to its GGUF name with gguf-py's tensor
name tables, reorders q/k rows where llama.cpp's rotary layout needs it, leaves tied output
embeddings out, and returns a `ModelPlan` that `gguf_out.write_gguf` writes. Weights are loaded
only when written; `weight_hook(hf_name, array)` may change them first (merging a LoRA does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from edge_genarm.errors import ConversionError

from .archs import ARCHS, IGNORED_SUFFIXES, Arch, permute_rows
from .checkpoint import Checkpoint, read_json
from .gguf_out import PlannedTensor, storage_type
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> "HParams":
        n_head = config["num_attention_heads"]
        return cls(n_layer=config["num_hidden_layers"], n_embd=config["hidden_size"],
                   n_ff=config["intermediate_size"], n_head=n_head,
                   n_head_kv=config.get("num_key_value_heads") or n_head,
                   head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
                   n_ctx=config.get("max_position_embeddings", 4096),
                   rope_theta=float(rope_parameters(config).get("rope_theta", 10000.0)),
                   rms_eps=float(config.get("rms_norm_eps", 1e-6)),
                   vocab_size=config["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", False)))


def hparams(config: dict, where: str) -> HParams:
    """`HParams.from_config`, refusing a config.json that lacks a size or gives it as text."""
    try:
        return HParams.from_config(config)
    except KeyError as exc:
        raise ConversionError(f"{where}/config.json lacks {exc}; pass the directory that "
                              "save_pretrained wrote") from None
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{where}/config.json has a size that is not a number ({exc}); "
                              "pass the directory that save_pretrained wrote") from None


def arch_of(config: dict, where: str) -> Arch:
    names = config.get("architectures") or []
    name = names[0] if names else None
    if name not in ARCHS:
        raise ConversionError(f"{where}: architecture {name!r} is not supported; supported: "
                              f"{', '.join(sorted(ARCHS))}")
    kind = rope_scaling_kind(config)
    if kind not in (None, "default", "linear") and not (kind == "llama3" and ARCHS[name].permute_qk):
        raise ConversionError(f"{where}: rope scaling {kind!r} is not supported; supported: "
                              "linear, llama3 (Llama 3.1 and later)")
    return ARCHS[name]


def rope_parameters(config: dict) -> dict:
    """Rope settings from either config layout: transformers 5 keeps them all in
    `rope_parameters`; earlier releases wrote `rope_theta` and `rope_scaling` at the top."""
    params = dict(config.get("rope_parameters") or {})
    params.update(config.get("rope_scaling") or {})
    if "rope_theta" in config:
        params.setdefault("rope_theta", config["rope_theta"])
    return params


def rope_scaling_kind(config: dict) -> str | None:
    params = rope_parameters(config)
    return params.get("rope_type", params.get("type"))


def llama3_rope_factors(config: dict, hp: "HParams") -> np.ndarray:
    """Llama 3.1's per-frequency rope divisors, as llama.cpp reads them from rope_freqs.weight:
    1 for high frequencies, `factor` for low ones, and a smooth blend between."""
    s = rope_parameters(config)
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get(
        "high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blended))
    return out.astype(np.float32)


@dataclass
class ModelPlan:
    arch: Arch
    hparams: HParams
    tensors: list[PlannedTensor]
    add_metadata: Callable[[gguf.GGUFWriter], None]


def read_config(directory) -> tuple[dict, Arch, HParams]:
    """config.json of a checkpoint, refused in one line unless it is a supported model's."""
    config = read_json(directory / "config.json")
    return config, arch_of(config, str(directory)), hparams(config, str(directory))


def plan_model(ckpt: Checkpoint, tokenizer: Tokenizer, outtype: str, name: str,
               weight_hook: Callable[[str, np.ndarray], np.ndarray] | None = None) -> ModelPlan:
    config, arch, hp = read_config(ckpt.dir)
    names = gguf.get_tensor_name_map(arch.gguf_arch, hp.n_layer)
    tensors = []
    for hf_name in ckpt.names():
        if hf_name.endswith(IGNORED_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and hp.tied:
            continue  # llama.cpp reads the output projection from token_embd when tied
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"{ckpt.dir}: the weight {hf_name} has no GGUF name for "
                                  f"{arch.name}; is this a {config['architectures'][0]}?")
        shape = ckpt.shape(hf_name)
        tensors.append(PlannedTensor(gguf_name, shape, storage_type(gguf_name, shape, outtype),
                                     _loader(ckpt, hf_name, arch, hp, weight_hook)))
    if rope_scaling_kind(config) == "llama3":
        factors = llama3_rope_factors(config, hp)
        tensors.append(PlannedTensor("rope_freqs.weight", factors.shape,
                                     gguf.GGMLQuantizationType.F32, lambda: factors))
    if tokenizer is not None and len(tokenizer.tokens) > hp.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokenizer.tokens)} tokens but the model "
                              f"only {hp.vocab_size} embeddings")

    def add_metadata(w: gguf.GGUFWriter) -> None:
        add_hparams(w, hp, name, outtype)
        if rope_scaling_kind(config) == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
        _add_tokenizer(w, tokenizer, hp.vocab_size)

    return ModelPlan(arch, hp, tensors, add_metadata)


def add_hparams(w: gguf.GGUFWriter, hp: HParams, name: str, outtype: str) -> None:
    """The model metadata llama.cpp's llama-family loaders read (the same for qwen2)."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_vocab_size(hp.vocab_size)
    w.add_file_type(_file_type(outtype))


def _loader(ckpt, hf_name, arch: Arch, hp: HParams, hook):
    def load() -> np.ndarray:
        data = ckpt.get(hf_name)
        if hook is not None:
            data = hook(hf_name, data)
        if arch.permute_qk and ".self_attn.q_proj." in hf_name:
            data = permute_rows(data, hp.n_head)
        elif arch.permute_qk and ".self_attn.k_proj." in hf_name:
            data = permute_rows(data, hp.n_head_kv)
        return data
    return load


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Write the tokenizer, padded to the embedding count as llama.cpp expects."""
    missing = vocab_size - len(tokenizer.tokens)
    for key, value, vtype, sub in tokenizer.fields:
        if missing > 0 and key == gguf.Keys.Tokenizer.LIST:
            value = list(value) + [f"[PAD{i}]" for i in range(len(value), vocab_size)]
        elif missing > 0 and key == gguf.Keys.Tokenizer.TOKEN_TYPE:
            value = list(value) + [int(gguf.TokenType.UNUSED)] * missing
        elif missing > 0 and key == gguf.Keys.Tokenizer.SCORES:
            value = list(value) + [-1000.0] * missing
        w.add_key_value(key, value, vtype, sub_type=sub)


def _file_type(outtype: str) -> int:
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
