"""PEFT LoRA adapters: to a GGUF LoRA adapter, or merged into their base model.

Contract: `Adapter(directory)` reads adapter_config.json and the lora_A / lora_B weights and
refuses what llama.cpp cannot hold (other PEFT types, DoRA, modules_to_save, adapters on the
embeddings or the output head), saying to merge those in PyTorch. Scales follow PEFT: alpha / r
or alpha / sqrt(r) (rsLoRA), alpha_pattern's first matching key, ranks as the weights have them.
`check_fits(shape_of, base)` refuses a base that lacks a changed weight or has it in another
shape (`BaseInfo.shape` gives a GGUF or Hugging Face base's). `gguf_pairs(base)` gives
{GGUF weight name: (A, B)} with B's rows reordered for q/k where the base's rotary layout needs
it and every module's PEFT scale folded so that llama.cpp's alpha / r reproduces it;
`gguf_alpha` is the alpha to write (for rsLoRA, alpha * sqrt(r)). `merge_hook` adds
scale * B @ A to the Hugging Face base weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from edge_genarm.errors import ConversionError

from .archs import ARCHS, Arch, permute_rows
from .checkpoint import ADAPTER_FILES, Checkpoint, read_json

_PREFIX = "base_model.model."
_UNMAPPABLE = ("embed_tokens", "lm_head", "wte", "wpe")
MERGE_IN_PYTORCH = ("merge it in PyTorch (PEFT's merge_and_unload, then save_pretrained) and "
                    "convert that directory")


@dataclass(frozen=True)
class BaseInfo:
    """What converting an adapter needs to know of its base."""
    arch: Arch
    n_layer: int
    n_head: int
    n_head_kv: int
    where: str
    shapes: dict[str, tuple[int, ...]]  # GGUF weight name -> NumPy shape (out, in)

    def shape(self, hf_weight: str) -> tuple[int, ...] | None:
        """The shape of a weight named as Hugging Face names it; None when the base lacks it."""
        names = gguf.get_tensor_name_map(self.arch.gguf_arch, self.n_layer)
        gguf_name = names.get_name(hf_weight, try_suffixes=(".weight",))
        return None if gguf_name is None else self.shapes.get(gguf_name)


def base_info_from_gguf(path: Path) -> BaseInfo:
    reader = gguf.GGUFReader(path)
    def get(key):
        field = reader.get_field(key)
        return None if field is None else field.contents()
    if get("general.type") == "adapter":
        raise ConversionError(f"--base {path} is a LoRA adapter; pass the GGUF of the base model "
                              "it belongs to")
    arch_name = get("general.architecture")
    arch = next((a for a in ARCHS.values() if a.name == arch_name), None)
    if arch is None:
        raise ConversionError(f"--base {path} is a {arch_name!r} model; supported: "
                              f"{', '.join(sorted({a.name for a in ARCHS.values()}))}")
    n_head = int(get(f"{arch_name}.attention.head_count"))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    return BaseInfo(arch, int(get(f"{arch_name}.block_count")), n_head,
                    int(get(f"{arch_name}.attention.head_count_kv") or n_head), str(path), shapes)


def base_info_from_dir(path: Path) -> BaseInfo:
    from .model import arch_of, hparams

    config = read_json(path / "config.json")
    arch = arch_of(config, str(path))
    hp = hparams(config, str(path))
    ckpt = Checkpoint(path)
    names = gguf.get_tensor_name_map(arch.gguf_arch, hp.n_layer)
    shapes = {names.get_name(n, try_suffixes=(".weight", ".bias")): n for n in ckpt.names()}
    shapes = {g: ckpt.shape(n) for g, n in shapes.items() if g is not None}
    return BaseInfo(arch, hp.n_layer, hp.n_head, hp.n_head_kv, str(path), shapes)


class Adapter:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.config = read_json(self.dir / "adapter_config.json")
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConversionError(f"{self.dir} is a {peft_type} adapter; only LoRA converts")
        if self.config.get("use_dora"):
            raise ConversionError(f"{self.dir} is a DoRA adapter, which llama.cpp cannot apply "
                                  f"and --merge cannot merge; {MERGE_IN_PYTORCH}")
        if self.config.get("modules_to_save"):
            raise ConversionError(
                f"{self.dir} also trains whole modules ({', '.join(self.config['modules_to_save'])}"
                f"), which a LoRA GGUF cannot hold and --merge cannot merge; {MERGE_IN_PYTORCH}")
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
                    f"(embeddings and output head) and --merge cannot merge; {MERGE_IN_PYTORCH}")
            if name.endswith(".lora_A.weight"):
                modules.append(name[: -len(".lora_A.weight")])
            elif not name.endswith(".lora_B.weight"):
                raise ConversionError(f"{self.dir}: unexpected tensor {name} in a LoRA adapter")
        if not modules:
            raise ConversionError(f"{self.dir} has no lora_A/lora_B weights")
        lone = [m for m in modules if f"{m}.lora_B.weight" not in self.ckpt]
        if lone:
            raise ConversionError(f"{self.dir} has {lone[0]}.lora_A.weight without its lora_B; "
                                  "save the adapter again")
        return modules

    def scale(self, module: str, rank: int) -> float:
        """PEFT's own scale for a module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = float(self.config.get("lora_alpha", 8))
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module.removeprefix(_PREFIX)):
                alpha = float(value)
                break  # PEFT takes the first key that matches, in the config's order
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def delta_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of a module's B @ A; A and B of different ranks are refused."""
        a = self.ckpt.shape(f"{module}.lora_A.weight")
        b = self.ckpt.shape(f"{module}.lora_B.weight")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ConversionError(f"{self.dir}: {module} has lora_A of shape {list(a)} and "
                                  f"lora_B of shape {list(b)}, which do not multiply; save the "
                                  "adapter again")
        return b[0], a[1]

    def check_fits(self, shape_of: Callable[[str], tuple[int, ...] | None], base: str) -> None:
        """Refuse a base that lacks a weight the adapter changes or has it in another shape;
        shape_of(Hugging Face weight name) gives the base's (out, in), or None."""
        for module in self.modules:
            weight = module.removeprefix(_PREFIX) + ".weight"
            have, want = shape_of(weight), self.delta_shape(module)
            if have is None:
                raise ConversionError(f"{base} lacks a weight the adapter {self.dir} changes: "
                                      f"{weight}; pass the base it was trained on")
            if tuple(have) != want:
                raise ConversionError(f"the adapter {self.dir} does not fit {base}: {weight} is "
                                      f"{list(have)} there but the adapter changes it as "
                                      f"{list(want)}; pass the base it was trained on")

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
