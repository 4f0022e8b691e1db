"""``latentrt serve``: the A1111-compatible HTTP API (FastAPI + uvicorn, the ``serve`` extra).

Binds to 127.0.0.1 unless told otherwise; ``--api-key`` (or ``LATENTRT_API_KEY``) makes
every endpoint but ``/health`` ask for ``Authorization: Bearer KEY`` (or HTTP Basic auth
with the key as password).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import Any

from latentrt.core.errors import LatentRTError

__all__ = ["add_serve_parser"]

logger = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the service and serve it until interrupted (Ctrl-C or SIGTERM shut it down cleanly)."""
    try:
        import uvicorn

        from latentrt.server import Defaults, create_app
    except ImportError as exc:
        raise LatentRTError(f"latentrt serve needs the serve extra: pip install 'latentrt[serve]' ({exc})") from None
    from latentrt.service import GenerationService, RequestLimits, ServiceConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get("LATENTRT_API_KEY") or None
    if api_key is None and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it may use it (--api-key)", args.host)
    limits = RequestLimits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                           max_batch_size=args.max_batch_size)  # fmt: skip
    config = ServiceConfig(
        workers=args.workers,
        max_queue=args.max_queue,
        batching=not args.no_batching,
        timeout_s=args.timeout or None,
        max_loaded_models=args.max_models,
        limits=limits,
        device=args.device,
        dtype=args.dtype,
    )
    service = GenerationService(args.checkpoint or ["demo"], config=config)
    app = create_app(service, api_key=api_key, defaults=Defaults(max_n_iter=args.max_n_iter))
    names = ", ".join(e.name for e in service.models.entries)
    logger.info("models: %s (default %s)", names, service.models.default.name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
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
    serve.set_defaults(run=cmd_serve)
