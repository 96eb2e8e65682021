"""`edge-genarm serve`: an OpenAI-compatible server where every request brings its own alignment.

The socket is bound first (a port in use is one line, before any model loads); the models load
on a thread while `/health` answers 503 (`worker.load_served`, each after a first decode in a
child process, so that a model that crashes llama.cpp ends the command with one line and exit
status 1); uvicorn serves the app from `app.py`.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import click

from .. import llama
from ..cluster import require_ray
from ..errors import UserError
from ..options import configure, flagged, generation_options, given_options
from ..worker import Served, load_served
from .app import ServeConfig, create_app


@click.command()
@generation_options(many_presets=True)
@click.option("--host", default="127.0.0.1", show_default=True, envvar="EDGE_GENARM_HOST",
              help="Address to listen on; anything but loopback wants --api-key "
              "[env EDGE_GENARM_HOST].")
@click.option("--port", type=int, default=8080, show_default=True, envvar="EDGE_GENARM_PORT",
              help="Port to listen on (0: any free one) [env EDGE_GENARM_PORT].")
@click.option("--parallel", "-np", type=int, default=4, show_default=True,
              envvar="EDGE_GENARM_PARALLEL", help="Sequences decoded together, per model "
              "[env EDGE_GENARM_PARALLEL].")
@click.option("--max-queue", type=int, default=64, show_default=True,
              envvar="EDGE_GENARM_MAX_QUEUE", help="Requests that may wait beyond --parallel; "
              "more are answered 503 [env EDGE_GENARM_MAX_QUEUE].")
@click.option("--api-key", default=None, envvar="EDGE_GENARM_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health "
              "[env EDGE_GENARM_API_KEY].")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Allow browser pages from ORIGIN (e.g. http://localhost:3000; * for any). "
              "Repeatable; off by default.")
@click.option("--max-body", type=int, default=1 << 20, show_default=True, metavar="BYTES",
              help="Largest request body; larger ones are answered 413.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
              metavar="[ADDRESS]", help="Serve on Ray Serve, on the cluster at ADDRESS (none: "
              "RAY_ADDRESS, one on this machine, or a new local one), one endpoint over "
              "--replicas engines; needs `pip install 'edge-genarm[cluster]'`.")
@click.option("--replicas", type=int, default=None, help="With --ray: engine replicas, each "
              "loading the models with its own --parallel [default: 1].")
def serve(host: str, port: int, parallel: int, max_queue: int, api_key: str | None,
          cors_origins: tuple[str, ...], max_body: int, ray_address: str | None,
          replicas: int | None, **kwargs) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) with guided
    generation: each request may set its own ARM weights ("arms": {"positive": 1.5})."""
    import uvicorn

    if max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {max_queue}")
    if max_body < 1024:
        raise UserError(f"--max-body must be at least 1024 bytes, got {max_body}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key, or drop the option")
    if replicas is not None and ray_address is None:
        raise UserError("--replicas spreads the server over Ray Serve: add --ray [ADDRESS]")
    if replicas is not None and replicas < 1:
        raise UserError(f"--replicas must be at least 1, got {replicas}")
    if ray_address is not None:
        require_ray()
    presets = kwargs.pop("preset") or (None,)
    if len(set(presets)) != len(presets):
        raise UserError("a --preset is named twice; name each once")
    defaults, given = given_options(kwargs)
    configs = {}
    for name in presets:  # each preset is checked now, before anything binds or loads
        try:
            config = configure(name, given | {"parallel": parallel}, defaults=defaults)
        except UserError as exc:
            raise flagged(exc, {"parallel": "--parallel"}) from None
        configs[config.name] = config
    first = next(iter(configs.values())).load
    llama.set_verbose(first.verbose)
    config = ServeConfig(api_key, list(cors_origins), max_body)
    sock = _bind(host, port)
    if not _is_loopback(host) and api_key is None:
        click.echo(f"Warning: listening on {host} without --api-key: anyone who can reach "
                   "this machine can use the models", err=True)
    if ray_address is not None:  # Ray Serve's proxy binds it: the check above is all
        port = sock.getsockname()[1]
        sock.close()
        from ..cluster import serve as on_ray
        return on_ray.run(ray_address or None, configs, replicas or 1, max_queue, config, host,
                          port)
    failure: list[BaseException] = []

    def load() -> dict[str, Served]:
        models = load_served(configs, max_queue, probe=True)
        click.echo(f"edge-genarm: serving {', '.join(models)} on http://{_url_host(host)}:"
                   f"{sock.getsockname()[1]}/v1", err=True)
        return models

    def fatal(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    app = create_app(config, load, fatal)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    if failure:
        exc = failure[0]
        raise exc if isinstance(exc, (UserError, KeyboardInterrupt)) else \
            UserError(f"loading the models failed: {exc}")
    sys.stderr.flush()


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another "
                        "--port or --host") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
