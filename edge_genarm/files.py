"""Files that appear whole or not at all.

Contract: `with staged(path) as tmp:` gives a fresh hidden file beside `path` (unique: two
writers never share one); when the block ends without an exception the file gets the mode any
new file would and is renamed over `path`, so readers see the old file or the new one, never
half of one; otherwise it is removed. `write_text(path, text)` does that for text. OSError is the
caller's to explain: it knows what the user was doing.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publishable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with staged(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def publishable(path: str | Path) -> None:
    """mkstemp makes files private (0600); a finished file gets the mode any new file would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
