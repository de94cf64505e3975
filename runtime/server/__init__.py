"""``moeport serve``: an OpenAI-compatible server (FastAPI + uvicorn) over the engine.

Needs the ``serve`` extra (``pip install 'moeport[serve]'``). Imported only by ``moeport serve`` and by
code that asks for it: the runtime itself does not depend on it.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from .app import ServerState, create_app

__all__ = ["ServerState", "create_app", "serve", "ServeError", "is_loopback"]

log = logging.getLogger("moeport.server")


class ServeError(ValueError):
    """The server cannot start as asked (e.g. a public address without an API key)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_queue: int = 256,
    api_key: str | None = None,
    served_model_name: str | None = None,
    prefix_cache_mb: float = 512,
    shutdown_timeout: float = 30,
    insecure: bool = False,
    log_level: str = "info",
    ready: Any = None,
    tool_call_parser: str | None = None,
) -> None:
    """Serve ``model`` until SIGTERM/SIGINT: then stop accepting (the listening socket closes; a request on a
    connection still open gets 503), let requests in flight finish, streams included (those still running
    after ``shutdown_timeout`` seconds are cancelled) and return normally. ``ready(server)`` is called with
    the uvicorn server once it listens (tests use it to find the port of ``port=0``)."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    from ..engine import Engine
    from .metrics import Metrics

    if not is_loopback(host) and not api_key and not insecure:
        raise ServeError(
            f"--host {host} is reachable from other machines: give --api-key (or MOEPORT_API_KEY), or pass "
            "--insecure to serve without one"
        )
    # sse-starlette (>= 3.2) would end every open stream as soon as uvicorn is told to exit; the drain is ours
    # (uvicorn waits up to shutdown_timeout for responses in flight, then cancels them).
    AppStatus.disable_automatic_graceful_drain()
    metrics = Metrics()
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefix_cache_mb=prefix_cache_mb, observer=metrics)
    metrics.bind(engine)
    name = served_model_name or model.artifact.directory.name
    state = ServerState(model, engine, name, api_key=api_key, metrics=metrics, tool_call_parser=tool_call_parser)
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,
        access_log=False,
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.closing = True  # /health says so and new requests get 503 while the rest finish
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it has stopped, which kills the process with it: a
            # graceful stop is a normal exit (status 0) here
            self._captured_signals.clear()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if ready is not None and self.started:
                ready(self)

    server = _Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot listen; it has logged why
        raise ServeError(f"could not serve on {host}:{port} (is the port in use?)") from exc
    finally:
        state.closing = True
        engine.close(timeout=0 if server.should_exit and server.force_exit else shutdown_timeout)
    if not server.started:
        raise ServeError(f"could not start the server on {host}:{port} (is the port in use?)")
