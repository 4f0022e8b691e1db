"""Peak memory of loading a full-size SD 1.5 single file, relative to its tensor bytes.

Each measurement runs in a fresh subprocess: import latentrt, note the resident set, load
the checkpoint, and report the peak resident set growth divided by the file's tensor
bytes. Loading without a second copy keeps the ratio near 1 (target: below 1.3 in fp32).
Results: ``benchmarks/results/load_memory.{json,md}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import charts
from full_size import cached_sd15, sd15_shapes

PROBE = r"""
import json, resource, sys, time
import latentrt
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
base = rss_mb()
start = time.perf_counter()
pipe = latentrt.load(sys.argv[1], dtype=sys.argv[2], progress=False)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"base_mb": base, "after_mb": rss_mb(), "peak_mb": peak, "load_s": elapsed}))
"""


def measure(path: Path, dtype: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), dtype], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    path = cached_sd15()
    tensor_mb = sum(4 * _numel(s) for s in sd15_shapes().values()) / 2**20
    rows = []
    for dtype in ("fp32", "bf16"):
        m = measure(path, dtype)
        rows.append(
            {
                "dtype": dtype,
                "tensor_mb_fp32": tensor_mb,
                **m,
                "peak_growth_over_tensors": (m["peak_mb"] - m["base_mb"]) / tensor_mb,
            }
        )
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "load_memory.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| load dtype | file tensors (MB, fp32) | peak RSS growth (MB) | ratio | load s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        growth, ratio = r["peak_mb"] - r["base_mb"], r["peak_growth_over_tensors"]
        lines.append(f"| {r['dtype']} | {r['tensor_mb_fp32']:.0f} | {growth:.0f} | {ratio:.2f} | {r['load_s']:.1f} |")
    (out / "load_memory.md").write_text(
        "SD 1.5 single file (random weights, fp32 on disk)\n\n" + "\n".join(lines) + "\n"
    )
    charts.draw("load_memory")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
