"""``latentrt serve``: the A1111-compatible HTTP API (FastAPI + uvicorn, the ``serve`` extra).

Binds to 127.0.0.1 unless told otherwise; ``--api-key`` (or ``LATENTRT_API_KEY``) makes
every endpoint but ``/health`` ask for ``Authorization: Bearer KEY`` (or HTTP Basic auth
with the key as password).

``--ray`` serves the same API from replicas of the service on Ray Serve (the ``ray``
extra, :mod:`latentrt.serve.ray`): ``--replicas N`` or ``--min-replicas A --max-replicas
B`` (autoscaling), on a new local cluster or the one at ``--address`` (``auto``: the
cluster ``ray start`` runs on this machine).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import TYPE_CHECKING, Any

from latentrt.core.errors import LatentRTError

if TYPE_CHECKING:
    from latentrt.serve import RayServeOptions, ReplicaSpec
    from latentrt.service import ServiceConfig

__all__ = ["add_serve_parser"]

logger = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the service and serve it until interrupted (Ctrl-C or SIGTERM shut it down cleanly)."""
    if args.ray:
        return _serve_on_ray(args)
    _refuse_ray_options(args)
    try:
        import uvicorn

        from latentrt.server import Defaults, create_app
    except ImportError as exc:
        raise LatentRTError(f"latentrt serve needs the serve extra: pip install 'latentrt[serve]' ({exc})") from None
    from latentrt.service import GenerationService

    api_key = _api_key(args)
    service = GenerationService(args.checkpoint or ["demo"], config=_service_config(args))
    app = create_app(service, api_key=api_key, defaults=Defaults(max_n_iter=args.max_n_iter))
    names = ", ".join(e.name for e in service.models.entries)
    logger.info("models: %s (default %s)", names, service.models.default.name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """The API key to require (``--api-key``, else ``$LATENTRT_API_KEY``), warning when serving openly without one."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key: str | None = args.api_key or os.environ.get("LATENTRT_API_KEY") or None
    if api_key is None and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it may use it (--api-key)", args.host)
    return api_key


def _service_config(args: argparse.Namespace) -> ServiceConfig:
    """The service settings the options ask for."""
    from latentrt.service import RequestLimits, ServiceConfig

    limits = RequestLimits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                           max_batch_size=args.max_batch_size)  # fmt: skip
    return ServiceConfig(
        workers=args.workers,
        max_queue=args.max_queue,
        batching=not args.no_batching,
        timeout_s=args.timeout or None,
        max_loaded_models=args.max_models,
        limits=limits,
        device=args.device,
        dtype=args.dtype,
    )


# options passed on to RayServeOptions as given (replica_gpus has a device-dependent default)
_RAY_SERVE_OPTIONS = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
                      "max_queued_requests", "replica_cpus")  # fmt: skip
_RAY_OPTIONS = ("address", *_RAY_SERVE_OPTIONS, "replica_gpus")


def _refuse_ray_options(args: argparse.Namespace) -> None:
    """Ray options without ``--ray`` would be ignored silently: refuse them."""
    given = [name for name in _RAY_OPTIONS if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise LatentRTError(f"{flags} only apply with --ray (serving on Ray Serve); add --ray or drop them")


def ray_settings(args: argparse.Namespace) -> tuple[ReplicaSpec, RayServeOptions]:
    """What ``latentrt serve --ray ...`` deploys: the replicas' spec and the Ray Serve options."""
    from latentrt.serve import RayServeOptions, ReplicaSpec

    service = _service_config(args)
    gpus = args.replica_gpus if args.replica_gpus is not None else (1.0 if service.device.startswith("cuda") else 0.0)
    given = {name: getattr(args, name) for name in _RAY_SERVE_OPTIONS if getattr(args, name) is not None}
    options = RayServeOptions(**given, replica_gpus=gpus)
    spec = ReplicaSpec(models=tuple(args.checkpoint or ["demo"]), service=service, api_key=_api_key(args),
                       max_n_iter=args.max_n_iter)  # fmt: skip
    return spec, options


def _serve_on_ray(args: argparse.Namespace) -> int:
    """``latentrt serve --ray``: deploy replicas of the service on Ray Serve and serve until interrupted."""
    try:
        from latentrt.serve.deploy import serve_on_ray
    except ImportError as exc:
        raise LatentRTError(f"latentrt serve --ray needs the ray extra: pip install 'latentrt[ray]' ({exc})") from None
    spec, options = ray_settings(args)
    serve_on_ray(spec, options, address=args.address, host=args.host, port=args.port)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_serve_parser(commands: Any, positive_int: Any) -> None:
    """The ``serve`` subcommand and its options."""
    serve = commands.add_parser("serve", help="serve the A1111-compatible HTTP API (needs latentrt[serve])")
    serve.add_argument("--checkpoint", action="append", metavar="PATH",
                       help="model to serve; repeat for several, the first is the default (default: demo)")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    serve.add_argument("--api-key", dest="api_key", help="require this key (default: $LATENTRT_API_KEY, else none)")
    serve.add_argument("--workers", type=positive_int, default=8, help="requests run at once, steps batched (8)")
    serve.add_argument("--max-queue", dest="max_queue", type=positive_int, default=64,
                       help="requests that may wait; more get 503 (64)")  # fmt: skip
    serve.add_argument("--no-batching", dest="no_batching", action="store_true",
                       help="run every request's backbone calls on their own")  # fmt: skip
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds per request incl. queue (600; 0: none)")
    serve.add_argument("--max-size", dest="max_size", type=positive_int, default=2048, help="largest width/height")
    serve.add_argument("--max-steps", dest="max_steps", type=positive_int, default=150)
    serve.add_argument("--max-batch-size", dest="max_batch_size", type=positive_int, default=16)
    serve.add_argument("--max-n-iter", dest="max_n_iter", type=positive_int, default=16)
    serve.add_argument("--max-models", dest="max_models", type=positive_int, default=2, help="models kept loaded")
    serve.add_argument("--device", default="cpu", help="cpu or cuda")
    serve.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    serve.add_argument("--log-level", dest="log_level", default="info", choices=("debug", "info", "warning", "error"))
    _add_ray_options(serve, positive_int)
    serve.set_defaults(run=cmd_serve)


def _add_ray_options(serve: argparse.ArgumentParser, positive_int: Any) -> None:
    """``--ray`` and the options of serving on Ray Serve (README: "Scale-out on Ray Serve")."""
    group = serve.add_argument_group("Ray Serve (--ray, needs latentrt[ray])")
    group.add_argument("--ray", action="store_true", help="serve from replicas of the service on Ray Serve")
    group.add_argument("--address", help="Ray cluster to join ('auto': the one `ray start` runs here; default: new)")
    group.add_argument("--replicas", type=positive_int, help="a fixed number of replicas (default 1)")
    group.add_argument("--min-replicas", dest="min_replicas", type=int, help="autoscale from this many replicas...")
    group.add_argument("--max-replicas", dest="max_replicas", type=positive_int, help="...up to this many")
    group.add_argument("--target-ongoing-requests", dest="target_ongoing_requests", type=float,
                       help="autoscaling target: requests per replica (default 4)")  # fmt: skip
    group.add_argument("--max-ongoing-requests", dest="max_ongoing_requests", type=positive_int,
                       help="requests a replica runs at once, steps batched (default: --workers)")  # fmt: skip
    group.add_argument("--max-queued-requests", dest="max_queued_requests", type=int,
                       help="requests that may wait for a replica; more get 503 (64; -1: no limit)")  # fmt: skip
    group.add_argument("--replica-cpus", dest="replica_cpus", type=float, help="CPU cores per replica (default 1)")
    group.add_argument("--replica-gpus", dest="replica_gpus", type=float,
                       help="GPUs per replica (default 1 with --device cuda, else 0)")  # fmt: skip
