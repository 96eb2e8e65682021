"""Independent references: llama-cpp-python's own `Llama`, loaded so that it runs on every CPU.

llama.cpp's AMX matmul crashes on some Intel CPUs with AMX on the first multi-token decode, and
`Llama` has no option for it. The references decide for themselves, from llama.cpp's own system
info (not through edge_genarm's loading code, which is what they check), and load without the
extra CPU buffer types where AMX is reported, as `--repack auto` does.
"""

from __future__ import annotations

from unittest import mock

import llama_cpp
from llama_cpp import llama_cpp as C


def amx_reported() -> bool:
    return "AMX_INT8 = 1" in C.llama_print_system_info().decode(errors="replace")


def reference_llama(path, plain: bool | None = None, **kwargs) -> llama_cpp.Llama:
    """`llama_cpp.Llama(path, **kwargs)`; `plain` (default: where AMX is reported) loads the
    weights into plain CPU buffers only (llama_model_params.use_extra_bufts = false)."""
    if not (amx_reported() if plain is None else plain):
        return llama_cpp.Llama(str(path), **kwargs)
    original = C.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    # Llama reads its model parameters from this function at construction
    with mock.patch.object(C, "llama_model_default_params", defaults):
        return llama_cpp.Llama(str(path), **kwargs)
