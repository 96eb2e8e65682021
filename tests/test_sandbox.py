"""The code runner and its bubblewrap sandbox, attacked. Each attack must fail inside, and each test
proves it by its effect on this machine (a listener that got no connection, a file that is not
there, no process left, a peak RSS under the limit), not by what the program says; where an effect
could be missed, a control run shows that the same probe does see it. Real subprocesses, a few
seconds each."""

from __future__ import annotations

import platform
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from recipes.coder import runner
from recipes.coder.runner import SandboxUnavailable, run_program

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def token() -> str:
    """A string that no other process's command line holds: the attack's processes carry it."""
    return f"edge-genarm-attack-{uuid.uuid4().hex}"


@pytest.fixture
def no_strays(token):
    """After the test: no process carrying the token, and no child of this one, is left."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    assert _carrying(token) == []
    assert [p for p in psutil.Process().children(recursive=True) if p.pid not in before] == []


def _carrying(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if token in " ".join(p.info["cmdline"] or ()):
            found.append(p)
    return found


def _watched(token: str, source: str, **limits) -> tuple[runner.RunResult, int, int]:
    """Run `source` while sampling this machine's processes that carry the token: the result,
    the most of them seen at once, and the most resident memory (bytes) they held together."""
    result: list[runner.RunResult] = []
    worker = threading.Thread(target=lambda: result.append(run_program(source, **limits)))
    worker.start()
    most = rss = 0
    while worker.is_alive():
        procs = _carrying(token)
        most = max(most, len(procs))
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        rss = max(rss, total)
        time.sleep(0.02)
    worker.join()
    return result[0], most, rss


def _as_command(code: str) -> str:
    """A program that replaces itself by `python -c code`, so that its processes (and their
    forks) show `code`, and a token in it, on their command line."""
    return f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {code!r}])\n"


# --- ordinary programs -------------------------------------------------------------------------

def test_a_passing_and_a_failing_program():
    ok = run_program("def f(x):\n    return x * 2\nassert f(2) == 4\nprint('fine')\n")
    assert ok.status == "passed" and ok.passed and "fine" in ok.output
    bad = run_program("assert 1 + 1 == 3, 'arithmetic'\n")
    assert bad.status == "failed" and bad.returncode == 1 and "arithmetic" in bad.output


def test_a_crashing_program_is_reported_as_crashed():
    crash = run_program("import ctypes\nctypes.string_at(0)\n")
    assert crash.status == "crashed" and crash.returncode == -signal.SIGSEGV


def test_a_hanging_program_is_killed_at_its_time_limit_with_its_children(token, no_strays):
    spin = f"while True: pass  # {token}"
    t0 = time.monotonic()
    hung, most, _ = _watched(token, _as_command(
        f"import subprocess, sys  # {token}\n"
        f"subprocess.Popen([sys.executable, '-c', {spin!r}])\n{spin}\n"), timeout=1.0)
    assert hung.status == "timeout" and time.monotonic() - t0 < 5
    assert most == 2                            # the child was there (and is gone: no_strays)


def test_an_isolated_interpreter_and_environment_in_a_throwaway_directory(token, targets):
    runs = set(Path(tempfile.gettempdir()).glob("edge-genarm-run-*"))
    where = run_program(f"import os, sys\nopen('{token}', 'w').write('x')\n"
                        "print(os.getcwd(), sys.flags.isolated, *sorted(os.environ))\n")
    cwd, isolated, *names = where.output.split()
    assert where.passed and isolated == "1"
    assert not (Path(cwd) / token).exists()       # written inside, not here
    assert set(Path(tempfile.gettempdir()).glob("edge-genarm-run-*")) == runs  # script dir gone
    # what the runner passes, PWD (bwrap's --chdir), the locale Python itself may set (PEP 538)
    assert set(names) - {"LC_CTYPE", "PWD"} == {"HOME", "PATH", "TMPDIR"}


# --- network -----------------------------------------------------------------------------------

@pytest.fixture
def listener():
    """A TCP listener on a free loopback port of this machine: the only target of the attacks."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        srv.setblocking(False)
        yield srv


def _accepted(srv: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


CONNECT = "import _socket; s = _socket.socket(); s.settimeout(2); s.connect(('127.0.0.1', {port}))"
NETWORK_ATTACKS = {
    "raw _socket": CONNECT + "\n",
    "subprocess": "import subprocess, sys\n"
                  "subprocess.run([sys.executable, '-c', {connect!r}])\n",
    "os.system bash /dev/tcp": "import os\n"
                               "os.system(\"bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}'\")\n",
    "os.system python": "import os, shlex, sys\n"
                        "os.system(shlex.join([sys.executable, '-c', {connect!r}]))\n",
}


@pytest.mark.parametrize("attack", NETWORK_ATTACKS)
def test_the_network_is_cut(listener, attack):
    port = listener.getsockname()[1]
    program = NETWORK_ATTACKS[attack].format(port=port, connect=CONNECT.format(port=port))
    run = run_program("try:\n" + "".join(f"    {line}\n" for line in program.splitlines())
                      + "finally:\n    print('tried')\n", timeout=20)
    assert "tried" in run.output        # the attempt was made (and the program ran to its end)
    time.sleep(0.2)
    assert _accepted(listener) == 0
    # control: the listener does count a connection
    with socket.create_connection(listener.getsockname(), timeout=2):
        time.sleep(0.2)
        assert _accepted(listener) == 1


# --- files -------------------------------------------------------------------------------------

@pytest.fixture
def targets(token):
    """Paths outside the throwaway directory: in the home directory, /tmp and the repository
    (removed afterwards, should an attack have left them)."""
    paths = [Path.home() / token, Path(tempfile.gettempdir()) / token, REPO / token]
    yield paths
    for t in paths:
        for p in (t, Path(f"{t}.sh")):
            p.unlink(missing_ok=True)


def test_nothing_outside_the_throwaway_directory_is_written(token, targets):
    writes = "".join(f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError as e:\n"
                     f"    print(e)\nos.system('touch {t}.sh')\n" for t in targets)
    run = run_program(f"import os\n{writes}open('{token}', 'w').write('x')\n"
                      f"print(open('{token}').read())\n")
    assert run.passed and run.output.strip().endswith("x")   # the throwaway directory is writable
    for t in targets:
        assert not t.exists() and not Path(f"{t}.sh").exists()


# --- processes ---------------------------------------------------------------------------------

def test_a_fork_bomb_stops_at_the_process_limit_and_leaves_nothing(token, no_strays):
    bomb = _as_command(f"import os, time  # {token}\n"
                       "while True:\n    try:\n        os.fork()\n"
                       "    except OSError:\n        time.sleep(0.05)\n")
    t0 = time.monotonic()
    run, most, _ = _watched(token, bomb, timeout=3.0)
    assert run.status == "timeout" and time.monotonic() - t0 < 15
    assert 1 < most <= runner.MAX_PROCESSES      # it forked, and was held at the limit


def _detached(token: str, sleep: float) -> str:
    """A grandchild in a session of its own (setsid, double fork) that writes /shared/marker
    after `sleep` seconds."""
    late = (f"import time; time.sleep({sleep})  # {token}\n"
            "open('/shared/marker', 'w').write('alive')\n")
    return ("import os, sys\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', {late!r}])\n"
            "    os._exit(0)\n"
            "os.wait()\n")


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A directory of this machine bound writable at /shared in the sandbox (this test's only
    change to it), where a surviving process could leave a mark."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    command = runner._command

    def with_shared(*args):
        argv = command(*args)
        end = argv.index("--remount-ro")      # while / is still writable
        return argv[:end] + ["--bind", str(d), "/shared"] + argv[end:]

    monkeypatch.setattr(runner, "_command", with_shared)
    return d


def test_a_detached_grandchild_dies_with_the_program(token, shared, no_strays):
    # control: while the program lives, its grandchild does write the marker
    run = run_program(_detached(token, 0.5) + "import time\ntime.sleep(3)\n")
    assert run.passed and (shared / "marker").read_text() == "alive"
    (shared / "marker").unlink()
    # the attack: the program ends at once; its grandchild must not outlive it
    run = run_program(_detached(token, 1.0))
    assert run.passed and _carrying(token) == []
    time.sleep(2.5)
    assert not (shared / "marker").exists()


def test_a_detached_grandchild_dies_with_a_program_killed_at_its_limit(token, shared, no_strays):
    run = run_program(_detached(token, 2.0) + "while True:\n    pass\n", timeout=1.0)
    assert run.status == "timeout" and _carrying(token) == []
    time.sleep(2.5)
    assert not (shared / "marker").exists()


# --- memory and CPU ----------------------------------------------------------------------------

def test_a_memory_hog_is_stopped_at_the_limit(token, no_strays):
    hog = _as_command(f"import time  # {token}\nchunks = []\nwhile True:\n"
                      "    chunks.append(b'x' * (16 << 20))  # written, so resident\n"
                      "    time.sleep(0.01)\n")
    run, _, rss = _watched(token, hog, timeout=30)
    assert run.status == "crashed" or (run.status == "failed" and "MemoryError" in run.output)
    assert 256 << 20 < rss < runner.MEMORY_LIMIT     # it grew, and not past the limit


def _busy_loop_in_c() -> str:
    """A program that jumps to itself forever in machine code, called through ctypes."""
    code = {"x86_64": b"\xeb\xfe", "aarch64": b"\x00\x00\x00\x14"}[platform.machine()]
    return ("import ctypes, mmap\n"
            "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            f"m.write({code!r})\n"
            "ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()\n")


def test_an_endless_loop_in_c_is_stopped_by_the_cpu_limit(no_strays):
    t0 = time.monotonic()
    run = run_program(_busy_loop_in_c(), timeout=60, cpu_seconds=1)
    assert run.status == "timeout" and run.returncode == -signal.SIGXCPU   # RLIMIT_CPU, not 60 s
    assert time.monotonic() - t0 < 15


def test_an_endless_call_in_c_is_stopped_by_the_wall_clock(no_strays):
    for program in (_busy_loop_in_c(), "import ctypes\nctypes.CDLL(None).pause()\n"):
        t0 = time.monotonic()
        run = run_program(program, timeout=1.5)
        assert run.status == "timeout" and run.returncode is None
        assert time.monotonic() - t0 < 10


# --- no sandbox, no run ------------------------------------------------------------------------

@pytest.fixture
def fresh_check():
    runner._require_sandbox.cache_clear()
    yield
    runner._require_sandbox.cache_clear()


def test_without_bwrap_nothing_runs(fresh_check, monkeypatch, tmp_path):
    mark = tmp_path / "ran"
    monkeypatch.setattr(runner, "BWRAP", "edge-genarm-no-such-bwrap")
    with pytest.raises(SandboxUnavailable, match="edge-genarm-no-such-bwrap not found"):
        run_program(f"open({str(mark)!r}, 'w')\n")
    monkeypatch.setattr(runner, "BWRAP", "false")    # present, but makes no sandbox
    with pytest.raises(SandboxUnavailable, match="cannot make a sandbox"):
        run_program(f"open({str(mark)!r}, 'w')\n")
    assert not mark.exists()
