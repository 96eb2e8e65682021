"""Running generated Python code in a bubblewrap sandbox: no network, nothing writable but a
throwaway directory, limits on memory, CPU time, processes and file size, and a wall-clock limit.

Contract: `run_program(source, timeout, cpu_seconds)` runs `source` as a script in `python -I`
(isolated: no user site, no PYTHON* variables, no current directory on the path) inside `bwrap`
(Debian package `bubblewrap`) and returns a `RunResult`: "passed" (exit 0), "failed" (a non-zero
exit: an exception or assertion), "timeout" (killed at `timeout` seconds of wall clock, or by
SIGXCPU at `cpu_seconds` of CPU time in one process) or "crashed" (killed by another signal;
`returncode` is minus the signal, as in `subprocess`).

The sandbox: new network, PID, IPC and UTS namespaces (no interface but its own loopback; when
the program exits or is killed, every process it started dies with the namespace, setsid() or
not, and `run_program` returns only once they are gone); a read-only view of the system's /usr,
/bin, /sbin, /lib* and the Python prefixes only (no home, no repository, no /run or /var, no /etc
but the loader's cache and the time zone); the throwaway directory is a size-capped tmpfs at /tmp
(also cwd, HOME and TMPDIR) that vanishes with the sandbox; the environment is PATH, HOME and
TMPDIR (and PWD, set by bwrap). Limits per process (prlimit): address space MEMORY_LIMIT, CPU time
`cpu_seconds`, file size FILE_LIMIT, no core files; and MAX_PROCESSES processes or threads in all.
Under root the program runs as a uid of its own, with no capabilities (setpriv), so that the
process limit binds (the kernel exempts uid 0 from it); otherwise bwrap puts it in a user
namespace of the caller's uid.

There is no unsandboxed fallback: where bwrap (0.7 or later), setpriv or prlimit is missing, or
bwrap cannot make the namespaces (checked once per process by running an empty program),
`run_program` raises `SandboxUnavailable` with one line saying why, and nothing is run. Not
bounded: the sum of memory over processes (up to MAX_PROCESSES x MEMORY_LIMIT; that would take a
cgroup).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

BWRAP = "bwrap"
MEMORY_LIMIT = 1 << 30   # bytes of address space, per process
FILE_LIMIT = 64 << 20    # bytes: the largest file, and the size of the writable /tmp
MAX_PROCESSES = 16       # processes and threads of the program, all together
PROGRAM = "/tmp/program.py"
# Read-only in the sandbox, where they exist; the Python prefixes are added to these.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/localtime")
# uids for root's sandboxes: 0x70000000 and up is outside what systemd gives to users, dynamic
# users and containers; one per run so that no two runs share a process count.
_UID_BASE, _UID_SPAN = 0x70000000, 1 << 24
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp"}


class SandboxUnavailable(RuntimeError):
    """This machine cannot run generated code isolated; it is then not run at all."""


@dataclass(frozen=True)
class RunResult:
    status: str        # passed, failed, timeout or crashed
    returncode: int | None
    output: str        # stdout and stderr, the last 4000 characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, timeout: float = 10.0, cpu_seconds: int | None = None) -> RunResult:
    """Run `source` in the sandbox; `cpu_seconds` (per process) defaults to the timeout rounded
    up plus one, so that for one process the wall clock comes first."""
    _require_sandbox()
    return _execute(source, timeout, cpu_seconds or math.ceil(timeout) + 1)


@functools.cache
def _require_sandbox() -> None:
    tools = [BWRAP, "prlimit"] + (["setpriv"] if os.geteuid() == 0 else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SandboxUnavailable(
            f"{' and '.join(missing)} not found: generated code is only run sandboxed; install "
            "bubblewrap and util-linux (Debian: apt-get install bubblewrap util-linux)")
    probe = _execute("", timeout=60, cpu_seconds=60)
    if probe.status != "passed":
        lines = probe.output.strip().splitlines() or [f"exit status {probe.returncode}"]
        raise SandboxUnavailable("bwrap cannot make a sandbox on this machine (bubblewrap 0.7 "
                                 f"or later is needed): {lines[-1]}")


def _execute(source: str, timeout: float, cpu_seconds: int) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="edge-genarm-run-") as host_dir:
        script = os.path.join(host_dir, "program.py")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(source)
        os.chmod(script, 0o644)          # readable by the sandbox's uid, whatever the umask
        status_r, status_w = os.pipe()   # bwrap's JSON lines: the sandbox's pid 1, its exit
        try:
            proc = subprocess.Popen(_command(script, cpu_seconds, status_w), env=_ENV, cwd="/",
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    pass_fds=(status_w,))
        finally:
            os.close(status_w)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # bwrap and the sandbox's pid 1 (a session of their own, so the group is theirs)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return RunResult("timeout", None, _tail(out))
        finally:
            _await_sandbox_end(status_r)
    return _classify(proc.returncode, _tail(out))


def _await_sandbox_end(status_fd: int) -> None:
    """Wait until the sandbox's pid 1 is gone (or a zombie). bwrap returns as soon as the program
    exits, and its pid 1 is then killed (--die-with-parent); the kernel kills the rest of the
    PID namespace before pid 1 is done, so this waits for every process the program started."""
    os.set_blocking(status_fd, False)
    status = b""
    with os.fdopen(status_fd, "rb") as fh, contextlib.suppress(BlockingIOError):
        status = fh.read() or b""
    pids = [json.loads(line).get("child-pid") for line in status.splitlines() if line.strip()]
    pid = next((p for p in pids if p), None)
    deadline = time.monotonic() + 10
    while pid is not None and time.monotonic() < deadline:
        try:
            init = psutil.Process(pid)
            if init.status() == psutil.STATUS_ZOMBIE or init.name() != "bwrap":
                return   # done, or the pid already reused
        except psutil.NoSuchProcess:
            return
        time.sleep(0.005)


def _command(script: str, cpu_seconds: int, status_fd: int) -> list[str]:
    """bwrap's arguments, then (as root) setpriv's, prlimit's and Python's."""
    argv = [shutil.which(BWRAP) or BWRAP, "--json-status-fd", str(status_fd),
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(FILE_LIMIT), "--tmpfs", "/tmp"]
    argv += _read_only_binds()
    argv += ["--ro-bind", script, PROGRAM, "--chdir", "/tmp", "--remount-ro", "/", "--"]
    if os.geteuid() == 0:
        uid = str(_UID_BASE + secrets.randbelow(_UID_SPAN))
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--"]
    # soft CPU limit: SIGXCPU; the hard one a second later: SIGKILL if SIGXCPU is ignored
    argv += ["prlimit", f"--as={MEMORY_LIMIT}", f"--cpu={cpu_seconds}:{cpu_seconds + 1}",
             f"--nproc={MAX_PROCESSES}", f"--fsize={FILE_LIMIT}", "--core=0", "--",
             sys.executable, "-I", PROGRAM]
    return argv


def _read_only_binds() -> list[str]:
    """Read-only binds of the system paths (where present) and the Python prefixes; the
    prefixes' parents made first as 0755 directories (bwrap would make them 0700, closed to the
    sandbox's uid)."""
    prefixes = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix,
                                             sys.exec_prefix, sys.base_exec_prefix)}
    prefixes = sorted(p for p in prefixes
                      if not any(p == s or p.startswith(s + "/") for s in SYSTEM_PATHS))
    parents: list[str] = []
    for p in prefixes:
        parent = os.path.dirname(p)
        while parent != "/" and parent not in parents:
            parents.append(parent)
            parent = os.path.dirname(parent)
    argv: list[str] = []
    for d in sorted(parents, key=lambda d: d.count("/")):
        argv += ["--perms", "0755", "--dir", d]
    for p in SYSTEM_PATHS:
        argv += ["--ro-bind-try", p, p]
    for p in prefixes:
        argv += ["--ro-bind", p, p]
    return argv


def _classify(returncode: int, output: str) -> RunResult:
    # bwrap reports a signal as 128 + its number, as shells do; turned back into subprocess's -N
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        returncode = 128 - returncode
    if returncode == 0:
        return RunResult("passed", 0, output)
    if returncode == -signal.SIGXCPU:
        return RunResult("timeout", returncode, output)
    return RunResult("crashed" if returncode < 0 else "failed", returncode, output)


def _tail(out: bytes | None) -> str:
    return (out or b"").decode("utf-8", errors="replace")[-4000:]
