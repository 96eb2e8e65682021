"""edge-genarm on a Ray cluster: batch generation over N actors, serving over N replicas.

Contract:
- Nothing here imports Ray until it is used, and without the `cluster` extra `require_ray()`
  raises `UserError` naming the package to install: the single-machine path never needs Ray.
- `ClusterSpec` says where and how wide: a Ray address (None: the cluster `ray.init()` finds,
  RAY_ADDRESS or one on this machine, else a new local one), the number of workers, and the
  checked `Config` each worker loads, its model references resolved on the worker's own node
  (`@NAME` models from that node's cache).
- `batch.ClusterModel` is the driver side of a batch job; `serve` deploys the server on Ray
  Serve.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..errors import UserError

INSTALL = "pip install 'edge-genarm[cluster]'"


def require_ray():
    """The `ray` module, or one line saying what to install."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass
class ClusterSpec:
    address: str | None          # None: ray.init()'s own choice
    workers: int | None          # None: one per node
    config: Config               # what each worker loads (references resolved on its node)

    def check(self, what: str = "--workers") -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or \
                self.workers < 1:
            raise UserError(f"{what} must be a whole number of at least 1, got {self.workers!r}")


def connect(address: str | None, verbose: bool = False):
    """Join the Ray cluster at `address` (once per process); the ray module. A cluster that
    cannot be reached is one line."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    import logging
    _check_reachable(address)
    try:
        ray.init(address=address or None, logging_level=logging.INFO if verbose else
                 logging.WARNING, log_to_driver=verbose, include_dashboard=False,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot join the Ray cluster at {address or 'auto'}: "
                        f"{first_line(exc)}; start one with `ray start --head`, or check the "
                        "address") from None
    return ray


def first_line(exc: BaseException, last: bool = False) -> str:
    """One line of an exception's message for a one-line error (Ray's deploy errors put the
    cause last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(exc).__name__


def _check_reachable(address: str | None) -> None:
    """Ray retries an address that does not answer for ever: try it once first."""
    if not address or address in ("auto", "local"):
        return
    import socket
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: give the head node as HOST:PORT (the address "
                        "`ray start --head` prints), or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: "
                        f"{exc.strerror or exc}; start one with `ray start --head`, or check "
                        "the address") from None
