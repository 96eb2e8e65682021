"""PEFT LoRA adapters: to a GGUF LoRA adapter, or merged into their base model.

Contract: `Adapter(directory)` reads adapter_config.json and the lora_A / lora_B weights and
refuses what llama.cpp cannot hold (other PEFT types, DoRA, modules_to_save, adapters on the
embeddings or the output head). `gguf_pairs(base)` gives {GGUF weight name: (A, B)} with B's
rows reordered for q/k where the base's rotary layout needs it and every module's PEFT scale
folded so that llama.cpp's alpha / r reproduces it; `gguf_alpha` is the alpha to write (for
rsLoRA, alpha * sqrt(r)). `merge_hook` adds scale * B @ A to the Hugging Face base weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_genarm.errors import ConversionError

from .archs import ARCHS, Arch, permute_rows
from .checkpoint import ADAPTER_FILES, Checkpoint, read_json

_PREFIX = "base_model.model."
_UNMAPPABLE = ("embed_tokens", "lm_head", "wte", "wpe")


@dataclass(frozen=True)
class BaseInfo:
    """What converting an adapter needs to know of its base."""
    arch: Arch
    n_layer: int
    n_head: int
    n_head_kv: int
    where: str


def base_info_from_gguf(path: Path) -> BaseInfo:
    reader = gguf.GGUFReader(path)
    def get(key):
        field = reader.get_field(key)
        return None if field is None else field.contents()
    arch_name = get("general.architecture")
    arch = next((a for a in ARCHS.values() if a.name == arch_name), None)
    if arch is None or get("general.type") == "adapter":
        raise ConversionError(f"{path} is not a base model of a supported architecture "
                              f"({arch_name}); pass the base model GGUF as --base")
    n_head = int(get(f"{arch_name}.attention.head_count"))
    return BaseInfo(arch, int(get(f"{arch_name}.block_count")), n_head,
                    int(get(f"{arch_name}.attention.head_count_kv") or n_head), str(path))


def base_info_from_dir(path: Path) -> BaseInfo:
    from .model import HParams, arch_of

    config = read_json(path / "config.json")
    hp = HParams.from_config(config)
    return BaseInfo(arch_of(config, str(path)), hp.n_layer, hp.n_head, hp.n_head_kv, str(path))


class Adapter:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.config = read_json(self.dir / "adapter_config.json")
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConversionError(f"{self.dir} is a {peft_type} adapter; only LoRA converts")
        if self.config.get("use_dora"):
            raise ConversionError(f"{self.dir} is a DoRA adapter, which llama.cpp cannot apply; "
                                  "merge it into the base in PyTorch and convert the result")
        if self.config.get("modules_to_save"):
            raise ConversionError(
                f"{self.dir} also trains whole modules ({self.config['modules_to_save']}), "
                "which a LoRA GGUF cannot hold; use --merge --base-model DIR")
        self.ckpt = Checkpoint(self.dir, ADAPTER_FILES)
        self.modules = self._modules()

    def _modules(self) -> list[str]:
        modules = []
        for name in self.ckpt.names():
            hit = re.match(rf"{re.escape(_PREFIX)}(.*?\b(?:{'|'.join(_UNMAPPABLE)}))\b", name)
            if hit or "lora_embedding" in name:
                module = hit.group(1) if hit else name.split(".lora_")[0].removeprefix(_PREFIX)
                raise ConversionError(
                    f"{self.dir} adapts {module}, which llama.cpp LoRA adapters cannot hold "
                    "(embeddings and output head); use --merge --base-model DIR instead")
            if name.endswith(".lora_A.weight"):
                modules.append(name[: -len(".lora_A.weight")])
            elif not name.endswith(".lora_B.weight"):
                raise ConversionError(f"{self.dir}: unexpected tensor {name} in a LoRA adapter")
        if not modules:
            raise ConversionError(f"{self.dir} has no lora_A/lora_B weights")
        return modules

    def scale(self, module: str, rank: int) -> float:
        """PEFT's own scale for a module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = float(self.config.get("lora_alpha", 8))
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module.removeprefix(_PREFIX)):
                alpha = float(value)
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def factors(self, module: str) -> tuple[np.ndarray, np.ndarray, float]:
        a = self.ckpt.get(f"{module}.lora_A.weight")
        b = self.ckpt.get(f"{module}.lora_B.weight")
        return a, b, self.scale(module, a.shape[0])

    def gguf_alpha(self) -> float:
        """One alpha for the file: scale * r of the first module (the rest is folded into B)."""
        a, _, scale = self.factors(self.modules[0])
        return scale * a.shape[0]

    def gguf_pairs(self, base: BaseInfo) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        names = gguf.get_tensor_name_map(base.arch.gguf_arch, base.n_layer)
        alpha = self.gguf_alpha()
        pairs = {}
        for module in self.modules:
            hf_name = module.removeprefix(_PREFIX)
            gguf_name = names.get_name(hf_name + ".weight", try_suffixes=(".weight",))
            if gguf_name is None:
                raise ConversionError(f"{self.dir} adapts {hf_name}, which has no GGUF name in "
                                      f"{base.arch.name}; pass the base it was trained on")
            a, b, scale = self.factors(module)
            b = b * np.float32(scale * a.shape[0] / alpha)  # llama.cpp applies alpha / r
            if base.arch.permute_qk and hf_name.endswith("self_attn.q_proj"):
                b = permute_rows(b, base.n_head)
            elif base.arch.permute_qk and hf_name.endswith("self_attn.k_proj"):
                b = permute_rows(b, base.n_head_kv)
            pairs[gguf_name] = (a, b)
        return pairs

    def merge_hook(self):
        """A weight hook for `plan_model`: W + scale * B @ A on the Hugging Face weights."""
        by_weight = {m.removeprefix(_PREFIX) + ".weight": m for m in self.modules}

        def hook(hf_name: str, data: np.ndarray) -> np.ndarray:
            module = by_weight.get(hf_name)
            if module is None:
                return data
            a, b, scale = self.factors(module)
            return data + np.float32(scale) * (b @ a)
        return hook

    def base_hint(self) -> Path | None:
        hint = self.config.get("base_model_name_or_path")
        return Path(hint) if hint and Path(hint).is_dir() else None
