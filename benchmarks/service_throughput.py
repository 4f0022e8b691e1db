"""GenerationService throughput (images/s) at concurrency 1, 4 and 8, with step batching on and off.

Closed loop: ``concurrency`` clients each submit a request and wait for it before the next,
``--requests`` requests in all per level, against one service (8 workers) over the built-in
demo model (64x64, CFG on, different prompts and seeds). With batching off the workers run
their backbone calls side by side (threads competing for the cores); with batching on those
calls are stacked into one. Also reported: mean latency and the share of denoiser calls that
ran stacked with another request. Results go to ``benchmarks/results/service_throughput.{json,md}``.

    python benchmarks/service_throughput.py --steps 10 --requests 16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import charts
import torch

import latentrt
from latentrt import GenerationRequest, Pipeline
from latentrt.service import GenerationService, ServiceConfig

PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square")


def request(k: int, steps: int, size: int) -> GenerationRequest:
    """Request ``k``: its own prompt, seed and CFG scale."""
    prompt = PROMPTS[k % len(PROMPTS)]
    return GenerationRequest(prompt, steps=steps, seed=k, cfg_scale=4.0 + k % 4, width=size, height=size)


def run_level(pipeline: Pipeline, batching: bool, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: ``args.requests`` requests from ``concurrency`` closed-loop clients."""
    config = ServiceConfig(workers=8, batching=batching, max_queue=256)
    with GenerationService({"demo": pipeline}, config=config) as service:
        service.submit(request(0, args.steps, args.size)).result()  # warm up
        before = service.metrics()
        latencies: list[float] = []

        def client(index: int) -> None:
            for k in range(index, args.requests, concurrency):
                start = time.perf_counter()
                service.submit(request(k, args.steps, args.size)).result()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(client, range(concurrency)))
        elapsed = time.perf_counter() - start
        after = service.metrics()
    calls = after["request_calls"] - before["request_calls"]
    stacked = after["stacked_request_calls"] - before["stacked_request_calls"]
    return {
        "batching": batching,
        "concurrency": concurrency,
        "images_per_s": args.requests / elapsed,
        "mean_latency_s": sum(latencies) / len(latencies),
        "backbone_calls": after["backbone_calls"] - before["backbone_calls"],
        "request_calls": calls,
        "stacked_share": stacked / calls if calls else 0.0,
    }


def main() -> None:
    """Measure every level and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    pipeline = latentrt.load("demo", progress=False)
    rows = []
    for batching in (False, True):
        for concurrency in (1, 4, 8):
            rows.append(run_level(pipeline, batching, concurrency, args))
            row = rows[-1]
            mode = "on " if batching else "off"
            print(
                f"batching {mode} concurrency {concurrency}: {row['images_per_s']:.2f} images/s, "
                f"latency {row['mean_latency_s']:.2f} s, {row['stacked_share']:.0%} of calls stacked",
                flush=True,
            )
    write_results(rows, args)


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """``results/service_throughput.json`` and ``.md``."""
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "latentrt": latentrt.__version__,
    }
    setup = {"model": "demo", "size": args.size, "steps": args.steps, "requests_per_level": args.requests, "workers": 8}
    report = {"machine": machine, "setup": setup, "rows": rows}
    (out / "service_throughput.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"GenerationService throughput; {setup}; {machine}",
        "",
        "| batching | concurrency | images/s | mean latency (s) | backbone calls | request calls | stacked |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['images_per_s']:.2f} | "
            f"{r['mean_latency_s']:.2f} | {r['backbone_calls']} | {r['request_calls']} | {r['stacked_share']:.0%} |"
        )
    (out / "service_throughput.md").write_text("\n".join(lines) + "\n")
    charts.draw("service_throughput")
    print(f"wrote {out / 'service_throughput.md'}")


if __name__ == "__main__":
    main()
