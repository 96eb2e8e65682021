"""Start an HTTP server as a subprocess on a free loopback port, for as long as a block runs.

Contract: `local_server(command, ready_path)` appends `--port N` (a port free on 127.0.0.1) to
`command`, starts it, and yields "http://127.0.0.1:N" once GET `ready_path` answers 200. If the
process exits first, or `timeout` seconds pass, `ServerStartError` carries the end of its
output. When the block ends the process gets SIGINT (a clean shutdown), then is killed if it
has not exited in `stop_timeout` seconds. The output goes to a temporary file, never a pipe that
nobody reads (a full pipe would stall the server). Scripts and tests that drive a real server
(edge-genarm's or another) use it; nothing here sends traffic beyond loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_server(command: Sequence[str], ready_path: str = "/health", timeout: float = 120,
                 env: dict | None = None, cwd=None, stop_timeout: float = 30) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen([*command, "--port", str(port)], stdout=output,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd, text=True)
        try:
            _wait_ready(proc, url + ready_path, timeout, output)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen, ready_url: str, timeout: float, output) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            output.seek(0)
            raise ServerStartError(f"{' '.join(proc.args[:4])} exited with {proc.returncode}: "
                                   f"{output.read()[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(f"{ready_url} did not answer 200 within {timeout:g} s")
        time.sleep(0.2)
