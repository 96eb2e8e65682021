"""Writing GGUF files safely: complete or not at all, one tensor in memory at a time.

Contract: `write_gguf(path, architecture, add_metadata, tensors)` writes, in gguf-py's enforced
order, the header, the metadata that `add_metadata(writer)` adds, the tensor infos, then each
tensor's data as its `load()` produces it (so a 7B model never sits in memory whole), to a
temporary file beside `path`; only a complete file is renamed to `path`. A failure or Ctrl-C
leaves nothing that looks finished. `progress(i, n, name)` is called after each tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import gguf
import numpy as np

from edge_genarm import files

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its GGUF name, NumPy shape, storage type, and how to produce it."""
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # float32 data in `shape`; encoded here to `qtype`

    def encoded(self) -> np.ndarray:
        data = np.ascontiguousarray(self.load(), dtype=np.float32)
        if data.shape != self.shape:
            raise ValueError(f"{self.name}: expected shape {self.shape}, got {data.shape}")
        return gguf.quants.quantize(data, self.qtype)

    def byte_info(self) -> tuple[tuple[int, ...], np.dtype, int]:
        """(shape as stored, dtype as stored, bytes) without producing the data."""
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return self.shape, np.dtype(np.float32), 4 * int(np.prod(self.shape))
        if self.qtype == gguf.GGMLQuantizationType.F16:
            return self.shape, np.dtype(np.float16), 2 * int(np.prod(self.shape))
        shape = gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)
        return shape, np.dtype(np.uint8), int(np.prod(shape))


def storage_type(name: str, shape: Sequence[int], outtype: str) -> gguf.GGMLQuantizationType:
    """Norms, biases and other 1-D tensors stay F32 (as llama.cpp's converter keeps them); a
    tensor whose rows do not split into blocks falls back to F16."""
    qtype = QTYPES[outtype]
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block != 0:
        return gguf.GGMLQuantizationType.F16
    return qtype


def write_gguf(path: str | Path, architecture: str,
               add_metadata: Callable[[gguf.GGUFWriter], None],
               tensors: Sequence[PlannedTensor],
               progress: Callable[[int, int, str], None] | None = None,
               staged: bool = False) -> Path:
    """staged=True: `path` is already the caller's hidden temporary file; write it in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if staged:
        _write(path, architecture, add_metadata, tensors, progress)
        return path
    with files.staged(path) as tmp:
        _write(tmp, architecture, add_metadata, tensors, progress)
    return path


def _write(path: Path, architecture, add_metadata, tensors, progress) -> None:
    writer = gguf.GGUFWriter(str(path), architecture)
    add_metadata(writer)
    for t in tensors:
        shape, dtype, nbytes = t.byte_info()
        raw = None if t.qtype in (gguf.GGMLQuantizationType.F32,
                                  gguf.GGMLQuantizationType.F16) else t.qtype
        writer.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, t in enumerate(tensors):
        writer.write_tensor_data(t.encoded())
        if progress is not None:
            progress(i + 1, len(tensors), t.name)
    writer.close()


def write_lora_adapter(path: str | Path, architecture: str, alpha: float,
                       pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                       outtype: str = "f32", name: str | None = None, progress=None,
                       staged: bool = False) -> Path:
    """pairs: base GGUF tensor name -> (A of shape (r, in), B of shape (out, r)).

    llama.cpp adds (alpha / r) * B @ A to the base weight of shape (out, in).
    """
    tensors = []
    for target, (a, b) in pairs.items():
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{target}: the ranks of A {a.shape} and B {b.shape} differ")
        for suffix, t in (("lora_a", a), ("lora_b", b)):
            tensors.append(PlannedTensor(f"{target}.{suffix}", tuple(t.shape),
                                         storage_type(target, t.shape, outtype), lambda t=t: t))

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if name:
            w.add_name(name)

    return write_gguf(path, architecture, metadata, tensors, progress, staged=staged)


def with_reward_head(src: str | Path, dst: str | Path, weight: np.ndarray, bias: float,
                     objective: str) -> Path:
    """Write `dst`: the GGUF `src` (a model or a LoRA adapter, every field and tensor as it is)
    with a reward head in its metadata, so that it runs as a reward model."""
    from edge_genarm.reward import head_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    skip = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT)

    def metadata(w: gguf.GGUFWriter) -> None:
        for f in reader.fields.values():
            if f.name in skip or f.name.startswith("GGUF.") or f.name.startswith("reward."):
                continue
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        head_metadata(w, weight, bias, objective)

    tensors = [_Stored(t) for t in reader.tensors]
    return write_gguf(dst, arch, metadata, tensors)


class _Stored:
    """A tensor of a GGUF being read, written again byte for byte."""

    def __init__(self, tensor):
        self.name, self.qtype, self.data = tensor.name, tensor.tensor_type, tensor.data

    def byte_info(self):
        return self.data.shape, self.data.dtype, self.data.nbytes

    def encoded(self) -> np.ndarray:
        return self.data
