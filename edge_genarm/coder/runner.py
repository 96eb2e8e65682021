"""Running generated Python code: a fresh interpreter, a time limit, no network, a throwaway
directory.

Contract: `run_program(source, timeout)` runs `source` as a script in `python -I` (isolated:
no user site, no PYTHON* variables, no current directory on the path) in a temporary directory
that is removed afterwards, with an empty environment but PATH, limited memory and CPU time, and
returns a `RunResult`: "passed" (exit 0), "failed" (a non-zero exit: an exception or assertion),
"timeout" (killed at the limit) or "crashed" (killed by a signal). Networking is cut two ways:
the child enters a new network namespace when the OS lets it (root on Linux), and sockets
cannot be created from Python in any case.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
MEMORY_LIMIT = 1 << 30   # bytes of address space for the child
# Run first in the child: no socket can be made, whatever the namespace allowed.
_PRELUDE = """\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled for generated code")
_s.socket = _s.create_connection = _s.socketpair = _no_network
del _s, _no_network
"""


@dataclass(frozen=True)
class RunResult:
    status: str        # passed, failed, timeout or crashed
    returncode: int | None
    output: str        # stdout and stderr, the last 4000 characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limit_child() -> None:
    """In the child before exec: its own process group, memory and CPU limits, and no network
    namespace where the OS allows it."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    try:
        ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
    except (OSError, AttributeError):
        pass


def run_program(source: str, timeout: float = 10.0) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="edge-genarm-run-") as work:
        script = os.path.join(work, "program.py")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(_PRELUDE + source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work}
        proc = subprocess.Popen([sys.executable, "-I", script], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=_limit_child)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children it started too
            out, _ = proc.communicate()
            return RunResult("timeout", None, _tail(out))
        if proc.returncode == 0:
            status = "passed"
        else:
            status = "crashed" if proc.returncode < 0 else "failed"
        return RunResult(status, proc.returncode, _tail(out))


def _tail(out: bytes | None) -> str:
    return (out or b"").decode("utf-8", errors="replace")[-4000:]
