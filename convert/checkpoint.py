"""Hugging Face checkpoints and PEFT adapters on disk, read one tensor at a time.

Contract: `Checkpoint(directory)` finds the weights (safetensors, sharded or not, or PyTorch .bin
files loaded with `weights_only=True`, which never unpickles arbitrary objects), checks that
every shard named by an index is present, and gives `names()` and `get(name)` (float32 NumPy).
A truncated or damaged weights file, and a JSON file that does not parse to an object
(`read_json`), are refused in one line. torch is imported here only, and only when a checkpoint
is opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_genarm.errors import ConversionError

MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError("conversion needs PyTorch: pip install 'edge-genarm[convert]'") \
            from None
    return torch


def read_json(path: Path) -> dict:
    """A JSON object from a file; anything else is refused in one line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc}); pass the file that "
                              "save_pretrained wrote") from None
    except OSError as exc:
        raise ConversionError(f"{path} cannot be read ({os_reason(exc)})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not an object; pass "
                              "the file that save_pretrained wrote")
    return data


def first_line(exc: Exception) -> str:
    """The first line of a library's message (torch's run to paragraphs)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def os_reason(exc: OSError) -> str:
    """'permission denied' from an OSError, for messages that name the path themselves."""
    return (exc.strerror or str(exc)).lower()


class Checkpoint:
    """Tensors of a model or adapter directory, by their Hugging Face names."""

    def __init__(self, directory: str | Path, files: tuple[str, ...] = MODEL_FILES):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir} is not a directory; pass a Hugging Face model or "
                                  "PEFT adapter directory")
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for name in files:
            index = self.dir / f"{name}.index.json"
            if index.exists():
                self._from_index(index)
                break
            if (self.dir / name).exists():
                self._from_file(self.dir / name)
                break
        else:
            wanted = ", ".join(files)
            raise ConversionError(f"{self.dir} has no weights ({wanted} or a sharded index); "
                                  "pass the directory that save_pretrained wrote")

    def _from_index(self, index: Path) -> None:
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise ConversionError(f"{index}: weight_map must map tensor names to file names")
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).exists()})
        if missing:
            raise ConversionError(f"{self.dir} lacks {len(missing)} shard(s) that {index.name} "
                                  f"names: {', '.join(missing)}; download them too")
        self._where = {k: self.dir / v for k, v in weight_map.items()}

    def _from_file(self, path: Path) -> None:
        for name in self._handle(path).keys():
            self._where[name] = path

    def _handle(self, path: Path):
        if path not in self._open:
            torch = _torch()
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    self._open[path] = safe_open(str(path), framework="pt")
                except OSError as exc:
                    raise ConversionError(f"{path} cannot be read ({os_reason(exc)})") from None
                except Exception as exc:  # SafetensorError: a truncated or damaged file
                    raise ConversionError(f"{path} is not a readable safetensors file "
                                          f"({first_line(exc)}); "
                                          "download or save it again") from None
            else:
                try:
                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True,
                                                  mmap=True)
                except Exception as exc:  # weights_only refuses pickled code: say so plainly
                    raise ConversionError(f"{path} cannot be loaded as plain weights "
                                          f"({first_line(exc)}); "
                                          "re-save it with safetensors") from None
        return self._open[path]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self._where[name])
        if hasattr(handle, "get_slice"):
            return tuple(handle.get_slice(name).get_shape())
        return tuple(handle[name].shape)

    def get(self, name: str) -> np.ndarray:
        handle = self._handle(self._where[name])
        tensor = handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
        return tensor.float().numpy()
