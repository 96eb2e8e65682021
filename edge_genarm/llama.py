"""The one module that calls llama.cpp (through llama-cpp-python's ctypes bindings).

Contract: everything above this module sees plain Python and NumPy. Here:
- `Model`: a GGUF model loaded once (weights, vocabulary, metadata); it may serve many contexts.
- `LoraAdapter`: a GGUF LoRA adapter loaded onto a model, attached to one context only.
- `Context`: a KV cache with its own sequences; `decode` feeds (sequence, tokens, start position)
  entries as one batch and returns the last-position logits of each entry as a NumPy view that
  stays valid until the next decode on that context.
A llama-cpp-python upgrade that moves the C API should only ever touch this file.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import llama_cpp as C
from llama_cpp._ctypes_extensions import load_shared_library
import numpy as np

from . import penalties
from .errors import ContextFullError, EngineError, ModelFileError, UserError, plural

# ---------------------------------------------------------------------------------------------
# logging: llama.cpp logs to stderr by default; keep it quiet unless asked, but remember the last
# error lines so that a failed load can say why.

_log_state = {"verbose": False, "recent": [], "capture": None, "buffers": None}


@C.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace")
    if level in (2, 3):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        _log_state["recent"] = (_log_state["recent"] + [message.strip()])[-5:]
    if _log_state["buffers"] is not None and "model buffer size" in message:
        _log_state["buffers"].append(message)  # where a loading model's weights went
    if _log_state["capture"] is not None:  # a dry run's sizes, not shown even with --verbose
        _log_state["capture"].append(message)
    elif _log_state["verbose"]:
        sys.stderr.write(message)
        sys.stderr.flush()


C.llama_log_set(_log_callback, ctypes.c_void_p(0))
C.llama_backend_init()


def set_verbose(verbose: bool) -> None:
    """Let llama.cpp's own log lines through to stderr (off by default)."""
    _log_state["verbose"] = bool(verbose)


def last_log_error() -> str:
    recent = [line for line in _log_state["recent"] if line]
    return recent[-1] if recent else "no reason given"


def supports_gpu_offload() -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU (CUDA, Metal, ...)."""
    return bool(C.llama_supports_gpu_offload())


def max_parallel_sequences() -> int:
    """The most sequences one llama.cpp context can hold."""
    return int(C.llama_max_parallel_sequences())


def default_threads() -> int:
    """Threads per context: every core, since contexts are stepped one after another."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# OpenMP threads. An OpenMP build of llama.cpp (GCC's libgomp) keeps a pool of worker threads for
# each thread that has decoded. Once there are more pooled threads than CPUs, libgomp's barriers
# (one per graph node) spin 100 times instead of 300,000 before sleeping in the kernel, so a
# decode on a second thread (edge-genarm's stepping thread, after llama.cpp decoded on the
# caller's thread) runs 2 to 4 times slower although the first pool sits idle.


@functools.lru_cache(maxsize=1)
def _libgomp() -> ctypes.CDLL | None:
    """GCC's OpenMP runtime where this process has it loaded (llama.cpp's OpenMP builds)."""
    try:
        lib = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        lib.omp_pause_resource_all.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):  # no libgomp (another OpenMP, or none), or pre-5.0
        return None


def release_openmp_threads() -> bool:
    """End the calling thread's idle OpenMP worker threads (libgomp makes them again if this
    thread decodes later); True where there was a libgomp to ask. Called by the thread that
    hands decoding to another, so that only the decoding thread's pool counts."""
    lib = _libgomp()
    return lib is not None and lib.omp_pause_resource_all(1) == 0  # omp_pause_soft


# ---------------------------------------------------------------------------------------------
# Weight repacking. llama.cpp may move CPU weights into "extra" buffer types (AMX tiles on Intel
# CPUs with AMX, CPU_REPACK's interleaved layouts elsewhere). Its AMX matmul segfaults on some
# Sapphire Rapids-class CPUs on the first multi-token decode, and an override cannot drop AMX
# alone (an override to the CPU buffer re-selects among the extra types, AMX first), so "auto"
# turns every extra buffer type off where llama.cpp reports AMX, and keeps them elsewhere.

REPACK_CHOICES = ("auto", "on", "off")


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict[str, str]:
    """llama.cpp's own system info as {feature: value}, e.g. {"AVX2": "1", "AMX_INT8": "1"}."""
    info = C.llama_print_system_info().decode(errors="replace")
    return dict(re.findall(r"(\w+) = (\w+)", info))


def repack_decision(choice: str = "auto") -> tuple[bool, str]:
    """(repack or not, why) for a --repack choice: auto, on or off."""
    if choice not in REPACK_CHOICES:
        raise UserError(f"--repack must be one of {', '.join(REPACK_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "on", f"{choice} (asked for)"
    if cpu_features().get("AMX_INT8") == "1":
        return False, ("off (auto: llama.cpp reports AMX_INT8 on this CPU, whose AMX path "
                       "crashes on some; --repack on forces it)")
    return True, "on (auto: no AMX on this CPU)"


# ---------------------------------------------------------------------------------------------
# GGUF headers, read with ggml's own parser (the one llama.cpp loads with) without the tensor data.

_GGUF_TYPE_FLOAT32, _GGUF_TYPE_STRING, _GGUF_TYPE_ARRAY = 6, 8, 9


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def _ggml_base() -> ctypes.CDLL:
    # llama-cpp-python's own loader knows its library names on Linux, macOS and Windows
    lib = load_shared_library("ggml-base", Path(C.__file__).parent / "lib")
    sigs = {
        "gguf_init_from_file": ([ctypes.c_char_p, _GGUFInitParams], ctypes.c_void_p),
        "gguf_free": ([ctypes.c_void_p], None),
        "gguf_get_n_kv": ([ctypes.c_void_p], ctypes.c_int64),
        "gguf_get_key": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_kv_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_val_str": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_val_f32": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_float),
        "gguf_get_arr_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_arr_n": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_arr_data": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_void_p),
        "gguf_get_data_offset": ([ctypes.c_void_p], ctypes.c_size_t),
        "gguf_get_n_tensors": ([ctypes.c_void_p], ctypes.c_int64),
        "gguf_get_tensor_name": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_tensor_offset": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_tensor_size": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_tensor_ne": ([ctypes.c_void_p, ctypes.c_int64], ctypes.POINTER(ctypes.c_int64)),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


@dataclass(frozen=True)
class GGUFHeader:
    strings: dict[str, str]                        # the string-valued metadata
    floats: dict[str, float | tuple[float, ...]]   # float32 values and float32 arrays
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (ne, file offset, bytes)


def read_gguf_header(path: str | Path) -> GGUFHeader | None:
    """Metadata strings and tensor layout of a GGUF file; None when ggml cannot parse it."""
    lib = _ggml_base()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        return None
    try:
        strings, floats = {}, {}
        for i in range(lib.gguf_get_n_kv(ctx)):
            key, kind = lib.gguf_get_key(ctx, i).decode(), lib.gguf_get_kv_type(ctx, i)
            if kind == _GGUF_TYPE_STRING:
                strings[key] = lib.gguf_get_val_str(ctx, i).decode("utf-8", errors="replace")
            elif kind == _GGUF_TYPE_FLOAT32:
                floats[key] = float(lib.gguf_get_val_f32(ctx, i))
            elif kind == _GGUF_TYPE_ARRAY and lib.gguf_get_arr_type(ctx, i) == _GGUF_TYPE_FLOAT32:
                n = lib.gguf_get_arr_n(ctx, i)
                data = ctypes.cast(lib.gguf_get_arr_data(ctx, i), ctypes.POINTER(ctypes.c_float))
                floats[key] = tuple(data[:n])
        base = lib.gguf_get_data_offset(ctx)
        tensors = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, i)
            dims = [ne[d] for d in range(4)]
            while len(dims) > 1 and dims[-1] == 1:
                dims.pop()
            tensors[lib.gguf_get_tensor_name(ctx, i).decode()] = (
                tuple(dims), base + lib.gguf_get_tensor_offset(ctx, i),
                lib.gguf_get_tensor_size(ctx, i))
        return GGUFHeader(strings, floats, tensors)
    finally:
        lib.gguf_free(ctx)


# ---------------------------------------------------------------------------------------------


_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")


class Model:
    """A GGUF model loaded once; `close` frees it (contexts made from it must be closed first)."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, vocab_only: bool = False,
                 repack: str = "auto"):
        self.path = Path(path)
        self.repack, why = repack_decision(repack)
        params = C.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only  # tokenizer and metadata only, no weights
        params.use_extra_bufts = self.repack
        _log_state["buffers"] = lines = []
        try:
            ptr = C.llama_model_load_from_file(str(self.path).encode(), params)
        finally:
            _log_state["buffers"] = None
        if not ptr:
            raise ModelFileError(f"llama.cpp could not load {self.path}: {last_log_error()}")
        self.ptr = ptr
        # buffer type -> MiB of weights in it (CPU, CPU_REPACK, AMX, CUDA0, ...)
        self.buffers = {name: float(mib) for name, mib in
                        _BUFFER_LINE.findall("".join(lines))}
        self.repack_reason = why
        if _log_state["verbose"] and not vocab_only:
            sys.stderr.write(f"edge-genarm: {self.path.name}: weights in {self.describe_buffers()};"
                             f" weight repacking {why}\n")
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self.vocab_type = int(C.llama_vocab_type(self.vocab))
        self.n_ctx_train = int(C.llama_model_n_ctx_train(ptr))
        self.n_embd = int(C.llama_model_n_embd(ptr))
        self.size = int(C.llama_model_size(ptr))  # bytes of weights: what a step reads
        self.n_gpu_layers = n_gpu_layers
        self._dry_breakers: dict[tuple[str, ...], penalties.Breakers | None] = {}

    def describe_buffers(self) -> str:
        return ", ".join(f"{name} {mib:.1f} MiB" for name, mib in self.buffers.items()) or "none"

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when the key is absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def token_text(self, token: int) -> str:
        return C.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """Every token's text, by id (read once; vocabulary checks compare these)."""
        get = C.llama_vocab_get_text
        return [get(self.vocab, i).decode("utf-8", errors="replace") for i in range(self.n_vocab)]

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def eog_tokens(self) -> np.ndarray:
        """Every id that ends generation (EOS, EOT and the like), read once."""
        test = C.llama_vocab_is_eog
        return np.array([i for i in range(self.n_vocab) if test(self.vocab, i)], dtype=np.intp)

    @functools.cached_property
    def grammar_tokenizer(self):
        """llguidance's view of the vocabulary (every token's bytes, llama.cpp's tokenizer),
        built once (about a second for 150k tokens); every end-of-generation token ends a
        grammar's answer."""
        import llguidance
        control, user = C.LLAMA_TOKEN_ATTR_CONTROL, C.LLAMA_TOKEN_ATTR_USER_DEFINED
        tokens = []
        for token in range(self.n_vocab):
            data = self.piece(token)
            attr = C.llama_vocab_get_attr(self.vocab, token)
            # llguidance's mark of a special token (written <name> in a Lark grammar)
            if attr & control or attr & user and data[:1] == b"<" and data[-1:] == b">":
                data = b"\xff" + data
            tokens.append(data)
        tokenize = ctypes.cast(C.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        return llguidance.LLTokenizer.from_llamacpp(
            tokens=tokens, vocab_ptr=self.vocab, tokenize_fptr=tokenize,
            eos_token=[int(t) for t in self.eog_tokens], slices=None)

    def piece(self, token: int, special: bool = True) -> bytes:
        """A token's bytes as llama.cpp renders it, special tokens as their text."""
        buf = ctypes.create_string_buffer(256)
        n = C.llama_token_to_piece(self.vocab, token, buf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def special_token(self, name: str) -> int:
        """bos, eos or eot id (-1 when the vocabulary has none)."""
        return int(getattr(C, f"llama_vocab_{name}")(self.vocab))

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # bytes from argv or stdin that were not UTF-8
            raise UserError("the input is not UTF-8 text; convert it to UTF-8 first") from None
        cap = len(data) + 16
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token renders to; control tokens (end of turn, ...) render to nothing."""
        return self.piece(token, special=False)

    def dry_breakers(self, strings: Sequence[str]) -> penalties.Breakers | None:
        """DRY's sequence breakers as llama.cpp's `llama_sampler_init_dry` processes them: each
        token rendered as it renders one (special tokens as their text), the rest of a breaker
        that a token's text begins tokenized without special tokens (found once per set of
        strings: it renders every token, about a second for 150k)."""
        key = tuple(strings)
        if key not in self._dry_breakers:
            one = (C.llama_token * 1)()

            def piece(token: int, size: int = 256) -> bytes:
                one[0], text = token, ctypes.create_string_buffer(size)
                n = C.llama_detokenize(self.vocab, one, 1, text, size, False, True)
                return text.raw[:n] if n >= 0 else piece(token, -n)  # -n: the size needed

            def tokenize(data: bytes, size: int = 64) -> list[int]:
                buf = (C.llama_token * size)()
                n = C.llama_tokenize(self.vocab, data, len(data), buf, size, False, False)
                return list(buf[:n]) if n >= 0 else tokenize(data, -n)

            pieces = [piece(t) for t in range(self.n_vocab)] if key else []
            self._dry_breakers[key] = penalties.process_breakers(key, pieces, tokenize)
        return self._dry_breakers[key]

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None


class LoraAdapter:
    """A LoRA adapter GGUF loaded onto `model`; freed with the model."""

    def __init__(self, model: Model, path: str | Path):
        self.path = Path(path)
        self.model = model
        ptr = C.llama_adapter_lora_init(model.ptr, str(self.path).encode())
        if not ptr:
            raise ModelFileError(
                f"llama.cpp could not attach the LoRA adapter {self.path} to {model.path}: "
                f"{last_log_error()}")
        self.ptr = ptr


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int = 2048           # tokens per sequence
    n_threads: int = 0          # 0: default_threads()
    n_seq_max: int = 1
    n_batch: int = 512
    exact: bool = False         # F32 KV cache and flash attention off, for PyTorch comparisons
    n_cells: int = 0            # KV cells shared by all sequences; 0: n_ctx x n_seq_max
    n_logits: int = 1           # most positions of one sequence whose logits a decode returns
    hidden: bool = False        # decode returns final-norm hidden states, not logits

    @property
    def cells(self) -> int:
        return self.n_cells or self.n_ctx * self.n_seq_max


_MAX_CELLS = 2**31 - 1  # llama.cpp counts cells and positions in 32-bit signed integers


def _context_params(settings: ContextSettings):
    """llama.cpp's context parameters for these settings (real contexts and dry runs alike)."""
    cells = settings.cells
    if cells > _MAX_CELLS:
        raise UserError(f"{cells} KV cells ({plural(settings.n_seq_max, 'sequence')} of "
                        f"{settings.n_ctx} tokens) are more than llama.cpp can address "
                        f"({_MAX_CELLS}); lower --ctx-size, --n-parallel or --kv-size")
    params = C.llama_context_default_params()
    # n_ctx is per sequence; the unified KV cache's cells are shared by all sequences (by
    # default n_seq_max full windows, so that sequences never run each other out of room)
    params.n_ctx = cells
    params.n_batch = min(settings.n_batch, settings.n_ctx)
    params.n_ubatch = params.n_batch
    params.n_seq_max = settings.n_seq_max
    # Logits are reserved for what is read (the last position of each sequence, or n_logits of
    # them): room for n_batch rows would cost n_batch * n_vocab floats of compute buffer.
    params.n_outputs_max = settings.n_seq_max * settings.n_logits
    params.n_outputs_max_per_seq = settings.n_logits
    threads = settings.n_threads or default_threads()
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    params.kv_unified = True
    if settings.hidden:  # per-token hidden states, no pooling
        params.embeddings = True
        params.pooling_type = C.LLAMA_POOLING_TYPE_NONE
        # with embeddings on, llama.cpp outputs every token of a batch (logits too): room for
        # n_batch rows (and one per sequence, which it reserves at creation); a reward model's
        # context keeps n_batch small for that reason
        params.n_outputs_max = max(params.n_batch, settings.n_seq_max)
        params.n_outputs_max_per_seq = params.n_batch
    if settings.exact:
        params.type_k = C.GGML_TYPE_F32
        params.type_v = C.GGML_TYPE_F32
        params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return params


@dataclass(frozen=True)
class ContextMemory:
    """Bytes of host memory a context needs, as llama.cpp itself reports them."""
    kv: int
    compute: int
    output: int

    @property
    def total(self) -> int:
        return self.kv + self.compute + self.output


_MEMORY_LINES = {
    "kv": re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB"),
    "compute": re.compile(r"CPU compute buffer size =\s*([\d.]+) MiB"),
    "output": re.compile(r"CPU\s+output buffer size =\s*([\d.]+) MiB"),
}


@functools.lru_cache(maxsize=256)
def context_memory(path: str, mtime_ns: int, settings: ContextSettings) -> ContextMemory:
    """What a context of `settings` on the model at `path` would take, from a dry run.

    The model is loaded with `no_alloc` (metadata only, no weights read) and the context made on
    it simulates its allocations and logs llama.cpp's own sizes, which are parsed here: the
    same figures a real context would allocate, in about 0.1 s and no memory.
    """
    params = C.llama_model_default_params()
    params.no_alloc = True
    params.load_mode = C.LLAMA_LOAD_MODE_NONE
    lines: list[str] = []
    _log_state["capture"] = lines
    try:
        model = C.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise ModelFileError(f"llama.cpp could not read {path}: {last_log_error()}")
        ctx = C.llama_init_from_model(model, _context_params(settings))
        if ctx:
            C.llama_free(ctx)
        C.llama_model_free(model)
    finally:
        _log_state["capture"] = None
    if not ctx:
        raise UserError(f"llama.cpp cannot make a context of {settings.n_ctx} tokens x "
                        f"{settings.n_seq_max} sequences for {path}: {last_log_error()}")
    text = "".join(lines)
    sizes = {key: sum(float(m) for m in rx.findall(text)) for key, rx in _MEMORY_LINES.items()}
    return ContextMemory(**{k: int(v * 2**20) for k, v in sizes.items()})


def _chunks(flat: list[tuple], n_batch: int, max_outputs: int) -> Iterator[list[tuple]]:
    """(seq, token, position, wants output) entries in runs of at most n_batch tokens and at
    most max_outputs outputs."""
    chunk: list[tuple] = []
    outputs = 0
    for entry in flat:
        if len(chunk) == n_batch or (entry[3] and outputs == max_outputs):
            yield chunk
            chunk, outputs = [], 0
        chunk.append(entry)
        outputs += entry[3]
    yield chunk


class Context:
    """A llama.cpp context (KV cache + compute buffers) of one model, optionally with a LoRA."""

    def __init__(self, model: Model, settings: ContextSettings,
                 adapter: LoraAdapter | None = None, adapter_scale: float = 1.0):
        self.model = model
        self.settings = settings
        params = _context_params(settings)
        ptr = C.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise UserError(f"llama.cpp could not create a context of {settings.n_ctx} tokens for "
                            f"{model.path}: {last_log_error()}; try a smaller --ctx-size")
        self.ptr = ptr
        self.memory = C.llama_get_memory(ptr)
        # llama.cpp may round the window up; the user's size is the limit we keep to
        self.n_ctx = min(settings.n_ctx, int(C.llama_n_ctx(ptr)))
        self.n_cells = int(C.llama_n_ctx(ptr))  # KV cells for all sequences together
        self.n_batch = int(C.llama_n_batch(ptr))
        self.adapter = adapter
        if adapter is not None:
            adapters = (C.llama_adapter_lora_p_ctypes * 1)(adapter.ptr)
            scales = (ctypes.c_float * 1)(adapter_scale)
            if C.llama_set_adapters_lora(ptr, adapters, 1, scales) != 0:
                raise ModelFileError(f"llama.cpp could not set the LoRA adapter {adapter.path}")
        self._batch = _Batch(self.n_batch)
        self.n_decoded = 0  # tokens fed to this context so far (prompt reuse shows here)

    # -- KV cache -------------------------------------------------------------------------------
    def seq_remove(self, seq_id: int, start: int = 0, end: int = -1) -> None:
        """Forget positions [start, end) of a sequence (end -1: to its end)."""
        C.llama_memory_seq_rm(self.memory, seq_id, start, end)

    def seq_copy(self, src: int, dst: int, start: int = 0, end: int = -1) -> None:
        C.llama_memory_seq_cp(self.memory, src, dst, start, end)

    def seq_end(self, seq_id: int) -> int:
        """One past the last position this context holds for a sequence (0: none)."""
        return int(C.llama_memory_seq_pos_max(self.memory, seq_id)) + 1

    def clear(self) -> None:
        C.llama_memory_clear(self.memory, True)

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, entries: Sequence[tuple]) -> np.ndarray:
        """Feed each (seq_id, tokens, first position[, n]) entry; return the logits rows (the
        hidden-state rows, with settings.hidden) of each entry's last n positions (1 by default;
        at most the settings' n_logits), in order.

        Entries are packed into batches of at most n_batch tokens and at most as many output
        rows as the context reserved (n_seq_max x n_logits: llama.cpp aborts beyond). The
        result is a view of llama.cpp's buffer when all entries end in the last batch (the
        usual case), else a copy.
        """
        flat = [(e[0], tok, e[2] + j, j >= len(e[1]) - (e[3] if len(e) > 3 else 1))
                for e in entries for j, tok in enumerate(e[1])]
        if not flat:
            raise ValueError("decode needs at least one token")
        self.n_decoded += len(flat)
        rows: list[np.ndarray] = []
        chunks = list(_chunks(flat, self.n_batch, self.settings.n_seq_max * self.settings.n_logits))
        for k, chunk in enumerate(chunks):
            n_out = self._batch.fill(chunk)
            code = C.llama_decode(self.ptr, self._batch.struct)
            if code == 1:
                raise ContextFullError(
                    f"the context of {self.n_ctx} tokens is full; raise --ctx-size")
            if code != 0:
                raise EngineError(f"llama.cpp failed to decode a batch (code {code}): "
                                  f"{last_log_error()}")
            if n_out:
                view = self._output_rows(self._batch.output_index(n_out))
                last_chunk = k == len(chunks) - 1
                rows.append(view if last_chunk else view.copy())  # the next decode overwrites it
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _output_rows(self, batch_indices: np.ndarray) -> np.ndarray:
        get, width = ((C.llama_get_embeddings_ith, self.model.n_embd) if self.settings.hidden
                      else (C.llama_get_logits_ith, self.model.n_vocab))
        first = get(self.ptr, int(batch_indices[0]))
        view = np.ctypeslib.as_array(first, shape=(len(batch_indices), width))
        if len(batch_indices) > 1:
            last = get(self.ptr, int(batch_indices[-1]))
            step = ctypes.addressof(last.contents) - ctypes.addressof(first.contents)
            if step != 4 * width * (len(batch_indices) - 1):  # rows not contiguous: copy
                rows = [np.ctypeslib.as_array(get(self.ptr, int(i)), shape=(width,)).copy()
                        for i in batch_indices]
                return np.stack(rows)
        return view

    def close(self) -> None:
        if self.ptr:
            C.llama_free(self.ptr)
            self.ptr = None


class _Batch:
    """A llama_batch whose arrays are NumPy buffers, filled without a per-field ctypes loop."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        # seq_id is an array of pointers, one per token, each to that token's single sequence id
        self.seq_ptrs = (self.seq.ctypes.data + 4 * np.arange(capacity, dtype=np.uint64))
        self.struct = C.llama_batch()
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(C.llama_token))
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(C.llama_pos))
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = self.seq_ptrs.ctypes.data_as(
            ctypes.POINTER(ctypes.POINTER(C.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def fill(self, chunk: Sequence[tuple[int, int, int, bool]]) -> int:
        """Load (seq, token, pos, wants_logits) rows; return how many want logits."""
        n = len(chunk)
        seqs, toks, poss, outs = zip(*chunk)
        self.seq[:n] = seqs
        self.token[:n] = toks
        self.pos[:n] = poss
        self.logits[:n] = outs
        self.struct.n_tokens = n
        return int(self.logits[:n].sum())

    def output_index(self, n_out: int) -> np.ndarray:
        return np.flatnonzero(self.logits[:self.struct.n_tokens])[:n_out]


# ---------------------------------------------------------------------------------------------
# quantization with llama.cpp's own quantizer

QUANT_TYPES = {name[len("LLAMA_FTYPE_MOSTLY_"):]: value for name, value in vars(C).items()
               if name.startswith("LLAMA_FTYPE_MOSTLY_")} | {"F32": C.LLAMA_FTYPE_ALL_F32}


def quant_type(type_name: str) -> int:
    """llama.cpp's file type for a name such as Q8_0; an unknown name says which ones exist."""
    ftype = QUANT_TYPES.get(type_name.upper())
    if ftype is None:
        raise UserError(f"unknown quantization type {type_name}; choose one of "
                        f"{', '.join(sorted(QUANT_TYPES))}")
    return ftype


def quantize_model(src: str | Path, dst: str | Path, type_name: str, n_threads: int = 0,
                   requantize: bool = False) -> None:
    """Write `dst`, the GGUF model `src` quantized to `type_name` (Q4_K_M, Q8_0, ...).

    `requantize` lets an already quantized `src` through (dequantized first: lossy)."""
    params = C.llama_model_quantize_default_params()
    params.ftype = quant_type(type_name)
    params.nthread = n_threads or default_threads()
    params.allow_requantize = requantize
    if C.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"llama.cpp could not quantize {src} to {type_name}: {last_log_error()}")
