"""What a GGUF file is, read from its header before llama.cpp is asked to load it.

Contract: `inspect_gguf(path)` returns a `GGUFInfo` (model or LoRA adapter, architecture, tensor
shapes, string and float metadata) or raises `ModelFileError` with one line that names the file
and what is wrong with it: missing, not GGUF, damaged or truncated.
`GGUFInfo.check_adapter_fits(base)` refuses an adapter made for another architecture or other
tensor shapes. llama.cpp's own failures on such files are log lines and a NULL pointer; checking
here first lets every refusal say what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import IncompatibleModelsError, ModelFileError
from .llama import last_log_error, read_gguf_header

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    kind: str                 # general.type: "model" or "adapter"
    architecture: str
    adapter_type: str | None  # adapter.type ("lora") for adapters
    shapes: dict[str, tuple[int, ...]]  # tensor name -> ggml dims (ne order: columns first)
    strings: dict[str, str] = field(default_factory=dict)  # string metadata
    floats: dict = field(default_factory=dict)  # float32 metadata: values and arrays

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"

    def check_adapter_fits(self, base: "GGUFInfo") -> None:
        """Refuse a LoRA adapter that llama.cpp could not attach to `base`."""
        if not self.is_adapter:
            raise IncompatibleModelsError(
                f"{self.path} is a full model, not a LoRA adapter; after '+' name the adapter "
                "GGUF (MODEL+ADAPTER)")
        if self.adapter_type != "lora":
            raise IncompatibleModelsError(
                f"{self.path} is a {self.adapter_type or 'unknown'} adapter; only LoRA adapters "
                "(adapter.type = lora) can be attached to a model")
        if self.architecture != base.architecture:
            raise IncompatibleModelsError(
                f"the LoRA adapter {self.path} is for architecture '{self.architecture}' but the "
                f"base {base.path} is '{base.architecture}'; pass the base it was trained on")
        for name, a_shape in sorted(self.shapes.items()):
            if not name.endswith(".lora_a"):
                continue
            target = name[: -len(".lora_a")]
            b_shape = self.shapes.get(target + ".lora_b")
            w_shape = base.shapes.get(target)
            if b_shape is None:
                raise ModelFileError(f"{self.path} has {name} without {target}.lora_b")
            if w_shape is None:
                raise IncompatibleModelsError(
                    f"the LoRA adapter {self.path} changes {target}, which the base {base.path} "
                    "does not have; pass the base it was trained on")
            fits = (a_shape[0] == w_shape[0] and b_shape[1] == w_shape[1]
                    and a_shape[1] == b_shape[0])
            if not fits:
                raise IncompatibleModelsError(
                    f"the LoRA adapter {self.path} does not fit {target} of the base {base.path} "
                    f"(A {list(a_shape)}, B {list(b_shape)}, weight {list(w_shape)}); pass the base "
                    "it was trained on")


def inspect_gguf(path: str | Path) -> GGUFInfo:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist; check the path")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file; pass the path of a .gguf file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "convert it with `edge-genarm convert` or pass a .gguf file")
    size = path.stat().st_size
    header = read_gguf_header(path)
    if header is None:
        raise ModelFileError(
            f"{path} is a damaged or truncated GGUF file ({size} bytes; its header does not "
            f"parse: {last_log_error()}); download or convert it again")
    for name, (_, offset, nbytes) in header.tensors.items():
        if offset + nbytes > size:
            raise ModelFileError(
                f"{path} is truncated: tensor {name} needs bytes up to {offset + nbytes} but the "
                f"file has {size}; download or convert it again")
    return GGUFInfo(
        path=path,
        kind=header.strings.get("general.type", "model"),
        architecture=header.strings.get("general.architecture", "unknown"),
        adapter_type=header.strings.get("adapter.type"),
        shapes={name: ne for name, (ne, _, _) in header.tensors.items()},
        strings=header.strings, floats=header.floats,
    )
