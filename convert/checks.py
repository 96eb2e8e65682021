"""Every argument of `convert` checked before any work, so that a refused command changes no file.

Contract: `source_kind(source)` says "model" or "adapter" or refuses a SOURCE that is missing, not
a directory, unreadable, or neither. `check_options(...)` refuses options that do not apply to
that kind, an unknown --quantize type, and --base, --base-model or --tokenizer-from paths that are
not what they must be. `check_out(out, force, inputs)` refuses an --out that is a directory, in a
folder that does not exist, one of the inputs, or an existing file without --force.
`staging_file(out)` creates the hidden file the output is written to first, refusing a folder it
cannot write in. Each refusal is one ConversionError line that names the option and what to do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edge_genarm.errors import ConversionError, ModelFileError
from edge_genarm.gguf_file import inspect_gguf
from edge_genarm.llama import QUANT_TYPES

from .checkpoint import os_reason

_WHAT_SOURCE = "pass a Hugging Face model or PEFT adapter directory"


def source_kind(source: Path) -> str:
    if not source.exists():
        raise ConversionError(f"{source} does not exist; {_WHAT_SOURCE}")
    if not source.is_dir():
        raise ConversionError(f"{source} is not a directory; {_WHAT_SOURCE}")
    try:
        names = set(os.listdir(source))
    except OSError as exc:
        raise ConversionError(f"{source} cannot be read ({os_reason(exc)}); {_WHAT_SOURCE} "
                              "that you may read") from None
    if "adapter_config.json" in names:
        return "adapter"
    if "config.json" in names:
        return "model"
    raise ConversionError(f"{source} has neither config.json nor adapter_config.json; "
                          f"{_WHAT_SOURCE} (as save_pretrained writes it)")


def check_options(source: Path, kind: str, outtype, quant, base, merge, base_model,
                  tokenizer_from) -> None:
    if merge and kind == "model":
        raise ConversionError(f"--merge applies to a LoRA adapter directory, and {source} is a "
                              "full model (config.json); convert it without --merge")
    if kind == "adapter" and not merge:
        for flag, given in (("--quantize", quant), ("--tokenizer-from", tokenizer_from)):
            if given:
                raise ConversionError(f"{flag} applies to full models, and {source} is a LoRA "
                                      f"adapter; add --merge to write the merged model")
    if base is not None and merge:
        raise ConversionError("--base applies to an adapter converted as an adapter; to --merge, "
                              "name the base's Hugging Face directory with --base-model DIR")
    if base is not None and kind == "model":
        raise ConversionError(f"--base applies to LoRA adapters, and {source} is a full model; "
                              "drop --base")
    if base_model is not None and kind == "model":
        raise ConversionError(f"--base-model applies to LoRA adapters, and {source} is a full "
                              "model; drop --base-model")
    if quant:
        _check_quant(quant, outtype)
    if base is not None:
        if base.is_dir():
            _check_model_dir("--base", base)
        else:
            _check_gguf("--base", base)
    if base_model is not None:
        _check_model_dir("--base-model", base_model)
    if tokenizer_from is not None:
        _check_gguf("--tokenizer-from", tokenizer_from)


def _check_quant(quant: str, outtype: str | None) -> None:
    if quant.upper() not in QUANT_TYPES:
        raise ConversionError(f"--quantize {quant}: unknown quantization type; choose one of "
                              f"{', '.join(sorted(QUANT_TYPES))}")
    if outtype == "q8_0":
        raise ConversionError("--quantize starts from an f32, f16 or bf16 model (llama.cpp does "
                              "not requantize); drop --outtype q8_0, or --quantize")


def _check_model_dir(flag: str, path: Path) -> None:
    if not path.exists():
        raise ConversionError(f"{flag} {path} does not exist; pass the base's Hugging Face "
                              "directory")
    if not path.is_dir():
        raise ConversionError(f"{flag} {path} is not a directory; pass the base's Hugging Face "
                              "directory")
    if not (path / "config.json").is_file():
        raise ConversionError(f"{flag} {path} has no config.json; pass the base's Hugging Face "
                              "directory (as save_pretrained writes it)")


def _check_gguf(flag: str, path: Path) -> None:
    try:
        info = inspect_gguf(path)
    except ModelFileError as exc:
        raise ConversionError(f"{flag} {exc}") from None
    except OSError as exc:
        raise ConversionError(f"{flag} {path} cannot be read ({os_reason(exc)})") from None
    if info.is_adapter:
        raise ConversionError(f"{flag} {path} is a LoRA adapter; pass the GGUF of a base model")


def check_out(out: Path, force: bool, inputs: dict[str, Path | None]) -> None:
    """inputs: option name -> path, for the files --out must never replace."""
    if out.is_dir():
        raise ConversionError(f"--out {out} is a directory; name the GGUF file to write, for "
                              f"example {out / 'model.gguf'}")
    folder = out.parent
    if not folder.is_dir():
        what = ("is a file, not a folder;" if folder.exists() else
                "does not exist; create it first or")
        raise ConversionError(f"--out {out}: the folder {folder} {what} choose another --out")
    for flag, path in inputs.items():
        if path is not None and path.exists() and out.exists() and os.path.samefile(path, out):
            raise ConversionError(f"--out {out} is also {flag}; choose another path")
    if out.exists() and not force:
        raise ConversionError(f"--out {out} already exists; pass --force to replace it, or "
                              "choose another path")


def staging_file(out: Path) -> Path:
    """A hidden ".part" file beside --out: a killed run leaves nothing that looks finished."""
    try:
        fd, staging = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    except OSError as exc:
        raise ConversionError(f"--out {out}: cannot write in {out.parent} ({os_reason(exc)}); "
                              "choose another --out") from None
    os.close(fd)
    return Path(staging)
