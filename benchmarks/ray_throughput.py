"""Ray Serve scale-out: images/s with 1 and 2 replicas, and the per-request overhead Ray adds.

On a local Ray cluster (``--cpus`` CPUs, loopback), the demo model (64x64, CFG on):

- throughput: ``--requests`` requests from ``--concurrency`` closed-loop clients, through a
  Ray Serve handle and over HTTP, with 1 and 2 replicas (1 CPU and ``--workers`` batched
  requests each), against a plain in-process :class:`GenerationService` with 1 and 2
  torch threads. On 2 cores expect little gain from a second replica: a single replica
  already keeps the cores busy; the number is for the record.
- overhead: one 1-step request at a time (``--overhead-requests`` of them): Ray handle vs
  the plain service, and HTTP through Ray Serve (proxy -> ingress -> replica) vs the same
  FastAPI app served by uvicorn in one process.

Results go to ``benchmarks/results/ray_throughput.{json,md}``.

    python benchmarks/ray_throughput.py --steps 10 --requests 16 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import charts
import httpx
import ray
import torch
import uvicorn
from ray import serve

import latentrt
from latentrt import GenerationRequest, Pipeline
from latentrt.serve import RayServeOptions, ReplicaSpec
from latentrt.serve.ray import APP_NAME, RayGenerationClient, build_app
from latentrt.server import create_app
from latentrt.service import GenerationService, ServiceConfig

PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square")


def request(k: int, steps: int) -> GenerationRequest:
    """Request ``k``: its own prompt, seed and CFG scale."""
    return GenerationRequest(PROMPTS[k % len(PROMPTS)], steps=steps, seed=k, cfg_scale=4.0 + k % 4)


def body(k: int, steps: int) -> dict[str, Any]:
    """Request ``k`` as an A1111 txt2img body."""
    r = request(k, steps)
    return {"prompt": r.prompt, "steps": steps, "seed": r.seed, "cfg_scale": r.cfg_scale}


def closed_loop(send: Callable[[int], object], requests: int, concurrency: int) -> dict[str, float]:
    """``requests`` calls of ``send(k)`` from ``concurrency`` clients, each awaiting its answer: images/s, latency."""
    latencies: list[float] = []

    def client(index: int) -> None:
        for k in range(index, requests, concurrency):
            start = time.perf_counter()
            send(k)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "images_per_s": requests / elapsed,
        "mean_latency_s": statistics.mean(latencies),
        "median_latency_s": statistics.median(latencies),
    }


def repeated(send: Callable[[int], object], args: argparse.Namespace) -> dict[str, Any]:
    """:func:`closed_loop` ``args.repeats`` times (this machine is shared): the run with the median images/s."""
    runs = sorted((closed_loop(send, args.requests, args.concurrency) for _ in range(args.repeats)),
                  key=lambda run: run["images_per_s"])  # fmt: skip
    return {**runs[len(runs) // 2], "runs_images_per_s": [round(r["images_per_s"], 2) for r in runs]}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def post(url: str) -> Callable[[int, int], None]:
    """A sender of txt2img bodies to ``url`` that fails loudly on any non-200 answer."""
    client = httpx.Client(timeout=600)

    def send(k: int, steps: int) -> None:
        response = client.post(f"{url}/sdapi/v1/txt2img", json=body(k, steps))
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

    return send


def plain_levels(pipeline: Pipeline, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The plain service in this process, with 1 and 2 torch threads."""
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        config = ServiceConfig(workers=args.workers, max_queue=256)
        with GenerationService({"demo": pipeline}, config=config) as service:
            service.submit(request(0, args.steps)).result()  # warm up
            row = repeated(lambda k, s=service: s.submit(request(k, args.steps)).result(), args)
        rows.append({"setup": f"plain service, {threads} torch thread(s)", "path": "in-process", **row})
        print(rows[-1], flush=True)
    torch.set_num_threads(1)
    return rows


def ray_levels(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    """Ray Serve with 1 and 2 replicas, through a handle and over HTTP."""
    rows = []
    for replicas in (1, 2):
        spec = ReplicaSpec(service=ServiceConfig(workers=args.workers, max_queue=256))
        options = RayServeOptions(replicas=replicas, max_queued_requests=-1)
        serve.run(build_app(spec, options), name=APP_NAME, route_prefix="/")
        client = RayGenerationClient(app_name=APP_NAME)
        client.generate(request(0, args.steps))  # warm up every path once
        send_http = post(url)
        send_http(0, args.steps)
        senders: dict[str, Callable[[int], object]] = {
            "handle": lambda k, c=client: c.generate(request(k, args.steps)),
            "http": lambda k, s=send_http: s(k, args.steps),
        }
        for path, send in senders.items():
            row = repeated(send, args)
            rows.append({"setup": f"Ray Serve, {replicas} replica(s)", "path": path, **row})
            print(rows[-1], flush=True)
    return rows


def overhead(pipeline: Pipeline, args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    """Latency of one 1-step request at a time: plain vs Ray, in-process vs handle, uvicorn vs Ray's HTTP."""
    n = args.overhead_requests
    torch.set_num_threads(1)
    rows = []
    with GenerationService({"demo": pipeline}, config=ServiceConfig(workers=1)) as service:
        rows.append(_latency("plain service", lambda k: service.submit(request(k, 1)).result(), n))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(service, own_service=False), port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        send_plain_http = post(f"http://127.0.0.1:{port}")
        rows.append(_latency("plain HTTP (uvicorn, same app)", lambda k: send_plain_http(k, 1), n))
        server.should_exit = True
        thread.join()
    serve.run(build_app(ReplicaSpec(service=ServiceConfig(workers=1)), RayServeOptions(replicas=1)), name=APP_NAME)
    client = RayGenerationClient(app_name=APP_NAME)
    rows.append(_latency("Ray Serve handle", lambda k: client.generate(request(k, 1)), n))
    send_http = post(url)
    rows.append(_latency("Ray Serve HTTP (proxy, ingress, replica)", lambda k: send_http(k, 1), n))
    return rows


def _latency(what: str, send: Callable[[int], object], n: int) -> dict[str, Any]:
    send(0)  # warm up
    times = []
    for k in range(n):
        start = time.perf_counter()
        send(k)
        times.append(time.perf_counter() - start)
    row = {"path": what, "mean_ms": 1000 * statistics.mean(times), "median_ms": 1000 * statistics.median(times)}
    print(row, flush=True)
    return row


def main() -> None:
    """Start a local cluster, measure, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=16, help="requests per throughput level")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8, help="batched requests per service/replica")
    parser.add_argument("--repeats", type=int, default=3, help="runs per throughput level; the median is kept")
    parser.add_argument("--overhead-requests", dest="overhead_requests", type=int, default=40)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = latentrt.load("demo", progress=False)
    started = time.perf_counter()
    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        throughput = plain_levels(pipeline, args) + ray_levels(args, url)
        latencies = overhead(pipeline, args, url)
    finally:
        serve.shutdown()
        ray.shutdown()
    write_results(throughput, latencies, args, time.perf_counter() - started)


def write_results(
    throughput: list[dict[str, Any]], latencies: list[dict[str, Any]], args: argparse.Namespace, took_s: float
) -> None:
    """``results/ray_throughput.json`` and ``.md``."""
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "ray_cpus": args.cpus,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "latentrt": latentrt.__version__,
    }
    setup = {"model": "demo", "size": 64, "steps": args.steps, "requests_per_level": args.requests,
             "repeats": args.repeats, "concurrency": args.concurrency, "workers_per_replica": args.workers,
             "overhead_requests": args.overhead_requests, "took_s": round(took_s, 1)}  # fmt: skip
    report = {"machine": machine, "setup": setup, "throughput": throughput, "overhead": latencies}
    (out / "ray_throughput.json").write_text(json.dumps(report, indent=2))
    base = {row["path"]: row["median_ms"] for row in latencies}
    handle_ms = base["Ray Serve handle"] - base["plain service"]
    http_ms = base["Ray Serve HTTP (proxy, ingress, replica)"] - base["plain HTTP (uvicorn, same app)"]
    lines = [
        f"Ray Serve scale-out; {setup}; {machine}",
        "",
        "| setup | path | images/s (median run) | all runs | mean latency (s) | median latency (s) |",
        "| --- | --- | ---: | --- | ---: | ---: |",
        *(
            f"| {r['setup']} | {r['path']} | {r['images_per_s']:.2f} | {r['runs_images_per_s']} | "
            f"{r['mean_latency_s']:.2f} | {r['median_latency_s']:.2f} |"
            for r in throughput
        ),
        "",
        "Per-request latency, one 1-step request at a time:",
        "",
        "| path | mean (ms) | median (ms) |",
        "| --- | ---: | ---: |",
        *(f"| {r['path']} | {r['mean_ms']:.1f} | {r['median_ms']:.1f} |" for r in latencies),
        "",
        f"Ray overhead per request (medians): handle {handle_ms:.1f} ms, HTTP {http_ms:.1f} ms.",
    ]
    (out / "ray_throughput.md").write_text("\n".join(lines) + "\n")
    charts.draw("ray_throughput")
    print(f"wrote {out / 'ray_throughput.md'}")


if __name__ == "__main__":
    main()
