"""Will an engine's models and contexts fit in memory? Checked before anything is allocated.

Contract: `check(config)` raises `UserError` when the weights, KV caches and buffers that
`Engine.load(config)` would allocate need more host memory than is available now, naming a number
of parallel sequences and a context size that would fit. Context sizes are llama.cpp's own (a dry
run that allocates nothing, `llama.context_memory`); available memory is psutil's. An engine with
layers on a GPU is not checked here: its caches live in device memory, which this does not see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from .errors import UserError
from .gguf_file import inspect_gguf
from .llama import ContextMemory, ContextSettings, context_memory
from .reward import context_settings as reward_context

# What the Python process itself takes besides llama.cpp's buffers (interpreter, NumPy, Jinja).
PROCESS_RESERVE = 256 * 2**20
# A LoRA context's compute buffer also holds the adapter's products: about twice the base's
# (31 against 16 MiB for SmolLM2 at 2048 tokens, `benchmarks/bench_guided.py --memory`).
LORA_COMPUTE_FACTOR = 2


@dataclass(frozen=True)
class Need:
    weights: int
    kv: int
    buffers: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.buffers + PROCESS_RESERVE


class Plan:
    """The files an engine loads and the contexts it makes, priced for any context settings."""

    def __init__(self, config):
        self.config = config
        self.base = Path(config.base)
        self.models = {self.base.resolve(): self.base}
        base_adapter = getattr(config, "base_adapter", None)
        self.adapters: list[Path] = [Path(base_adapter)] if base_adapter else []
        # (model file, is LoRA, candidates: a reward model's context, or 0)
        self.contexts: list[tuple[Path, bool, int]] = [(self.base, base_adapter is not None, 0)]
        for spec in config.arms:
            if getattr(spec, "adapter", None) is not None:  # a LoRA context of its own model
                self.models.setdefault(Path(spec.path).resolve(), Path(spec.path))
                self.adapters.append(Path(spec.adapter))
                self.contexts.append((Path(spec.path), True, 0))
            elif inspect_gguf(spec.path).is_adapter:
                self.adapters.append(Path(spec.path))
                self.contexts.append((self.base, True, 0))
            else:
                self.models.setdefault(Path(spec.path).resolve(), Path(spec.path))
                self.contexts.append((Path(spec.path), False, 0))
        reward = getattr(config, "reward", None)
        if reward is not None:
            self._add_reward(reward)
        draft = getattr(config, "draft", None)
        if draft is not None:  # priced as a full context: one logits row is a little less
            self.models.setdefault(Path(draft).resolve(), Path(draft))
            if config.draft_adapter is not None:
                self.adapters.append(Path(config.draft_adapter))
            self.contexts.append((Path(draft), config.draft_adapter is not None, 0))

    def _add_reward(self, spec) -> None:
        """A reward model: a model of its own (with its LoRA, if any), or a LoRA of the base."""
        lora_of_base = spec.adapter is None and inspect_gguf(spec.path).is_adapter
        model = self.base if lora_of_base else Path(spec.path)
        self.models.setdefault(model.resolve(), model)
        adapter = spec.path if lora_of_base else spec.adapter
        if adapter is not None:
            self.adapters.append(Path(adapter))
        self.contexts.append((model, adapter is not None, spec.candidates))

    def need(self, settings: ContextSettings) -> Need:
        weights = sum(p.stat().st_size for p in list(self.models.values()) + self.adapters)
        kv = buffers = 0
        for path, lora, k in self.contexts:
            own = reward_context(settings, k) if k else settings
            mem: ContextMemory = context_memory(str(path), path.stat().st_mtime_ns, own)
            kv += mem.kv
            buffers += mem.output + mem.compute * (LORA_COMPUTE_FACTOR if lora else 1)
        return Need(weights, kv, buffers)


def available() -> int:
    return int(psutil.virtual_memory().available)


def check(config, free: int | None = None) -> None:
    """Refuse, with sizes and a setting that fits, what would not fit in `free` bytes."""
    if config.n_gpu_layers != 0 or any(a.n_gpu_layers for a in config.arms):
        return  # llama.cpp's dry run prices host memory only
    free = available() if free is None else free
    plan = Plan(config)
    settings = config.context
    need = plan.need(settings)
    if need.total <= free:
        return
    fits = lambda s: plan.need(s).total <= free  # noqa: E731
    k = _largest(1, settings.n_seq_max - 1, lambda k: fits(replace(settings, n_seq_max=k)))
    n_ctx = _largest(16, settings.n_ctx - 1, lambda n: fits(replace(settings, n_ctx=n)))
    options = ([f"--n-parallel to {k}"] if k else []) + \
        ([f"--ctx-size to {n_ctx // 16 * 16}"] if n_ctx else [])
    advice = ("lower " + " or ".join(options)) if options else \
        "free some memory, or use smaller (more quantized) models"
    seqs = (f"{settings.n_seq_max} sequences of {settings.n_ctx} tokens need"
            if settings.n_seq_max > 1 else f"a context of {settings.n_ctx} tokens needs")
    raise UserError(
        f"{seqs} about {_gib(need.total)} GiB of memory (KV caches {_gib(need.kv)}, "
        f"buffers {_gib(need.buffers)}, weights {_gib(need.weights)}) but {_gib(free)} GiB is "
        f"available; {advice}")


def _largest(low: int, high: int, ok) -> int:
    """The largest n in [low, high] with ok(n) (ok is monotone: true up to a point); 0 if none."""
    if high < low or not ok(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"
