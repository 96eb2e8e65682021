"""Writing GGUF files safely: complete or not at all.

Contract: `write_gguf(path, fill)` hands a fresh `gguf.GGUFWriter` to `fill` (which adds metadata
and tensors), writes header, metadata and tensors in that order to a temporary file beside
`path`, and renames it to `path` only when all of it is on disk. `write_lora_adapter` writes a
LoRA adapter that llama.cpp attaches to a base model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import gguf
import numpy as np


def write_gguf(path: str | Path, architecture: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, architecture)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_lora_adapter(path: str | Path, architecture: str, alpha: float,
                       pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """pairs: base GGUF tensor name -> (A of shape (r, in), B of shape (out, r)).

    llama.cpp adds (alpha / r) * B @ A to the weight of shape (out, in).
    """
    def fill(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, (a, b) in pairs.items():
            if a.shape[0] != b.shape[1]:
                raise ValueError(f"{name}: rank of A {a.shape} and B {b.shape} differ")
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))

    return write_gguf(path, architecture, fill)
