"""Measure one real generation's peak resident set, in a fresh process, to check ``latentrt estimate``.

    python tools/measure_peak.py MODEL --width 256 --height 256 --batch 1 --dtype fp32 [--steps 2]
        [--storage-dtype fp16] [--offload sequential]

Prints one JSON line: the RSS after ``import latentrt`` (``base``), after loading (``loaded``), the peak
after loading (``load_peak``) and the peak of the whole run (``peak``, ``VmHWM``), all in bytes,
and the wall time of load and generation. Run it as its own process: peak RSS never goes down.
"""

from __future__ import annotations

import argparse
import json
import time

import latentrt
from latentrt.core.memory import peak_rss_bytes, rss_bytes


def main() -> None:
    """Load MODEL, generate once, print the memory readings as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--vae-tiling", dest="vae_tiling", action="store_true")
    parser.add_argument("--storage-dtype", dest="storage_dtype", choices=("fp16", "bf16"))
    parser.add_argument("--offload", choices=("none", "sequential"), default="none")
    args = parser.parse_args()
    base = rss_bytes()
    start = time.perf_counter()
    pipe = latentrt.load(
        args.model, dtype=args.dtype, vae_tiling=args.vae_tiling, progress=False,
        storage_dtype=args.storage_dtype, offload=args.offload,
    )  # fmt: skip
    loaded, load_peak, load_s = rss_bytes(), peak_rss_bytes(), time.perf_counter() - start
    start = time.perf_counter()
    pipe("a red circle", width=args.width, height=args.height, batch_size=args.batch, steps=args.steps, seed=1)
    reading = {"base": base, "loaded": loaded, "load_peak": load_peak, "peak": peak_rss_bytes()}
    print(json.dumps({**reading, "load_s": load_s, "generate_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
