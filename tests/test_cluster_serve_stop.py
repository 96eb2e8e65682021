"""`edge-genarm serve --ray` stopped impatiently (Ctrl-C, then Ctrl-C and SIGTERM again while it
takes its replicas down) finishes taking them down, exits 0, and leaves every CPU of the
cluster free. A module of its own: the Ray Serve application of tests/test_cluster_serve.py must be
gone before this one deploys under the same name."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import ray
from ray import serve

from edge_genarm.serve.launch import free_port


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.5)


def free_cpus() -> float:
    return ray.available_resources().get("CPU", 0.0)


def ready(url: str) -> bool:
    try:
        return "edge_genarm_kv_cells{" in httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return False


def test_repeated_interrupts_during_the_teardown_leave_no_replica(ray_cluster, tmp_path):
    with (tmp_path / "serve.log").open("w+") as log:
        proc = start(ray_cluster.address, log)
        try:
            assert free_cpus() < ray.cluster_resources()["CPU"]  # the replica holds one
            proc.send_signal(signal.SIGINT)
            for again in (signal.SIGINT, signal.SIGTERM):  # while the replicas go down
                time.sleep(0.5)
                proc.send_signal(again)
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                serve.shutdown()
        log.seek(0)
        output = log.read()
    # an interrupted teardown ends "Error: interrupted" with status 130
    assert proc.returncode == 0 and "Traceback" not in output, output[-2000:]
    wait_until(lambda: free_cpus() == ray.cluster_resources()["CPU"], 60,
               "every CPU of the cluster free again")


def start(address: str, log) -> subprocess.Popen:
    """`serve --ray` with one replica of the demo preset, once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_genarm", "serve", "--preset", "demo", "--threads", "1",
         "--parallel", "1", "--ctx-size", "256", "--ray", address, "--replicas", "1",
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ready(f"http://127.0.0.1:{port}") or proc.poll() is not None, 300,
                   "the replica up")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    if proc.poll() is not None:
        log.seek(0)
        raise AssertionError(f"the server exited: {log.read()[-2000:]}")
    return proc
