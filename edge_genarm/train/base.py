"""The model an ARM starts from: checked, its tokenizer, and its weights in PyTorch form.

Contract: `inspect_base(path)` returns a `Base` (a GGUF file or a Hugging Face directory, its
hidden size and context length) or raises `UserError` with one line, reading only headers and
metadata: a missing path, a file that is not GGUF or is damaged, a GGUF LoRA adapter, an
architecture that cannot be trained or converted, a directory without config.json, weights or a
tokenizer. `encoder(base)` encodes prompts through the base's own chat template and tokenizer.
`torch_dir(base, out)` is the base as a Hugging Face directory: a GGUF base is dequantized once
into out/base-hf (written beside and renamed, and made again when the GGUF changes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .data import Encoder

# the projections a LoRA may adapt in every architecture convert/ handles
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_HF = "base-hf"


@dataclass(frozen=True)
class Base:
    path: Path
    kind: str     # "gguf" or "hf"
    n_embd: int   # hidden size: the largest useful LoRA rank
    n_ctx: int    # the context length it was trained for


def inspect_base(path: Path) -> Base:
    if not path.exists():
        raise UserError(f"--base {path} does not exist; pass a GGUF file or a Hugging Face "
                        "model directory")
    return _hf_base(path) if path.is_dir() else _gguf_base(path)


def _gguf_base(path: Path) -> Base:
    from ..gguf_file import inspect_gguf

    info = inspect_gguf(path)
    if info.is_adapter:
        raise UserError(f"--base {path} is a LoRA adapter, not a model; pass the base model it "
                        "belongs to")
    from ..convert.from_gguf import HF_CLASS  # what gguf_to_hf reads back (gguf, no torch)

    if info.architecture not in HF_CLASS:
        raise UserError(f"--base {path} is a '{info.architecture}' GGUF; only "
                        f"{', '.join(HF_CLASS)} GGUFs can be trained from, so pass its Hugging "
                        "Face directory instead")
    embd = info.shapes.get("token_embd.weight")
    n_ctx = _vocab(path).meta(f"{info.architecture}.context_length")  # metadata, no weights
    return Base(path, "gguf", int(embd[0]) if embd else 0, int(n_ctx or 0))


def _hf_base(path: Path) -> Base:
    from edge_genarm.convert.checkpoint import Checkpoint, read_json
    from edge_genarm.convert.model import HParams, arch_of

    if not (path / "config.json").exists():
        raise UserError(f"--base {path} is a directory without config.json; pass a Hugging Face "
                        "model directory or a GGUF file")
    config = read_json(path / "config.json")
    arch_of(config, f"--base {path}")
    try:
        Checkpoint(path)  # the weights are there (sharded ones complete) and their headers read
    except UserError:
        raise
    except Exception as exc:  # safetensors' own errors for a damaged file
        raise UserError(f"--base {path}: its weights do not load ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); save the model "
                        "again") from None
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"--base {path} has no tokenizer (tokenizer.json or tokenizer.model); "
                        "copy the base's tokenizer files into it")
    try:
        hp = HParams.from_config(config)
    except (KeyError, TypeError) as exc:
        raise UserError(f"--base {path}/config.json lacks {exc}; pass the directory that "
                        "save_pretrained wrote") from None
    return Base(path, "hf", int(hp.n_embd), int(hp.n_ctx))


def _vocab(path: Path):
    from ..llama import Model

    return Model(path, vocab_only=True)


def encoder(base: Base) -> Encoder:
    return gguf_encoder(base.path) if base.kind == "gguf" else hf_encoder(base.path)


def gguf_encoder(path: Path) -> Encoder:
    from ..templates import build_messages, render_chat

    model = _vocab(path)
    template = model.meta("tokenizer.chat_template")
    eos = model.special_token("eos")
    end = model.special_token("eot") if model.special_token("eot") >= 0 else eos
    bos = model.special_token("bos")
    bos_text = model.token_text(bos) if bos >= 0 else ""

    def prompt(text: str) -> list[int]:
        if template is None:
            return model.tokenize(text, add_special=True)
        rendered = render_chat(template, build_messages(text, None), bos_text,
                               model.token_text(eos))
        return model.tokenize(rendered, add_special=False)

    return Encoder(prompt, lambda text: model.tokenize(text, False, False) + [end])


def hf_encoder(path: Path) -> Encoder:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--base {path}: its tokenizer does not load ({first})") from None
    end = tok.eos_token_id

    def prompt(text: str) -> list[int]:
        if tok.chat_template:
            rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=False)
            return tok(rendered, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    return Encoder(prompt, lambda text: tok(text, add_special_tokens=False)["input_ids"] + [end])


def torch_dir(base: Base, out: Path) -> Path:
    """A Hugging Face directory of the base's weights (for a GGUF, dequantized into out)."""
    if base.kind == "hf":
        return base.path
    from edge_genarm.convert.from_gguf import gguf_to_hf

    stat = base.path.stat()
    source = {"gguf": str(base.path.resolve()), "size": stat.st_size,
              "mtime_ns": stat.st_mtime_ns}
    hf_dir = out / BASE_HF
    try:
        if json.loads((hf_dir / "source.json").read_text()) == source:
            return hf_dir
    except (OSError, ValueError):
        pass
    staging = out / f".{BASE_HF}.part"
    shutil.rmtree(staging, ignore_errors=True)
    gguf_to_hf(base.path, staging)
    (staging / "source.json").write_text(json.dumps(source))
    shutil.rmtree(hf_dir, ignore_errors=True)
    staging.rename(hf_dir)  # a kill before this leaves no base-hf that looks finished
    return hf_dir
