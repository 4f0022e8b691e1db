"""``latentrt serve --ray``: join (or start) a Ray cluster, deploy the application, serve until stopped, drain."""

from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from latentrt.core.errors import LatentRTError
from latentrt.serve.config import RayServeOptions, ReplicaSpec
from latentrt.serve.ray import APP_NAME, build_app

__all__ = ["serve_on_ray"]

logger = logging.getLogger(__name__)


def serve_on_ray(
    spec: ReplicaSpec,
    options: RayServeOptions,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    app_name: str = APP_NAME,
    stop: threading.Event | None = None,
) -> None:
    """``latentrt serve --ray``: deploy on the cluster at ``address`` (None: a new local one) until stopped.

    Ctrl-C, SIGTERM or ``stop`` deletes the application: Ray Serve stops routing to its
    replicas and lets each finish its requests (``graceful_shutdown_timeout_s``) first.
    """
    started_here = _connect(address)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="EveryNode")
        _deploy(spec, options, app_name)
        logger.info("latentrt on Ray Serve: http://%s:%d (application %r); Ctrl-C drains and stops", host, port,
                    app_name)  # fmt: skip
        _wait_for_stop(stop or threading.Event())
    except KeyboardInterrupt:
        logger.info("interrupted while deploying")
    finally:
        logger.info("draining application %r", app_name)
        serve.delete(app_name)
        if started_here:
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()


def _deploy(spec: ReplicaSpec, options: RayServeOptions, app_name: str) -> None:
    """Run the application; a deployment that cannot start becomes one error saying where to look."""
    try:
        serve.run(build_app(spec, options), name=app_name, route_prefix="/")
    except RuntimeError as exc:
        raise LatentRTError(
            f"the replicas did not start ({exc}); `serve status` and the replica logs (under "
            "/tmp/ray/session_latest/logs/serve on each machine) say why: often a --checkpoint path missing on a "
            "machine, or a device it lacks"
        ) from None


def _connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (None: start one on this machine); True if it was started here."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or "local")  # "local": a new cluster, even where `ray start` runs one
    except ConnectionError as exc:
        raise LatentRTError(
            f"no Ray cluster at {address!r} ({exc}); start one with `ray start --head`, or leave out --address "
            "to start a local one"
        ) from None
    return address is None


def _wait_for_stop(stop: threading.Event) -> None:
    """Block until ``stop`` is set, SIGTERM arrives or Ctrl-C is pressed."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main else None
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
