#!/usr/bin/env bash
# GPU benchmark (under 8 minutes on one H200): full-size SD 1.5 at 512x512 and SDXL at 1024x1024,
# random fp16 weights, batch 1 with CFG, 20 steps: latentrt it/s and peak GPU memory for the UNet on
# eager torch, channels-last, CUDA graphs (and both) and torch.compile (skipped when its compile would
# run past the time budget), and diffusers' UNet in the same loop when diffusers is installed (skipped
# with a message otherwise).
#   bash benchmarks/gpu.sh [OUT_DIR]      (default: benchmarks/results; $OUT when set)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && py=.venv/bin/python
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA GPU visible to torch here; nothing to measure" >&2
    exit 1
fi
missing=$("$py" -c "
import importlib.util as u
print(' '.join(m for m in ('safetensors', 'pluggy', 'PIL', 'tqdm', 'numpy') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "gpu.sh: latentrt needs these packages, missing here: $missing (pip install them, or carry a venv)" >&2
    exit 1
fi
"$py" -c "import diffusers" 2>/dev/null || echo "gpu.sh: diffusers is not installed: its half is skipped"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cd benchmarks
timeout 470 "$py" gpu_bench.py --models sd15,sdxl --steps 20 --out "$out" 2>&1 | tee "$out/gpu_bench.log" || {
    echo "gpu.sh: the benchmark failed or ran past 470 s; see $out/gpu_bench.log" >&2
    exit 1
}
