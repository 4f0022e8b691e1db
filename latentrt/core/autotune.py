"""``dtype="auto"``: the fastest correct compute precision for the device at hand, said out loud.

* CUDA: fp16 (bf16 on GPUs that compute it natively, compute capability 8.0 and newer, where
  it avoids fp16's overflow in the SDXL VAE at the same speed);
* CPU: bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: ``avx512_bf16`` /
  ``amx_bf16`` in ``/proc/cpuinfo``; oneDNN then runs bf16 matmuls and convolutions about twice
  as fast as fp32), otherwise fp32: without those instructions bf16 is emulated and slower.

Attention always goes through ``scaled_dot_product_attention`` (fused kernels, no
``tokens x tokens`` matrix); the thread count stays torch's default (one per core).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["AutoChoice", "auto_choice", "cpu_flags", "native_bf16_cpu"]

logger = logging.getLogger(__name__)

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where ``/proc/cpuinfo`` cannot be read)."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16_cpu(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    return any(flag in (cpu_flags() if flags is None else flags) for flag in BF16_FLAGS)


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` picked, and why (one line for the log)."""

    dtype: torch.dtype
    threads: int
    reason: str

    def describe(self) -> str:
        """``auto: bf16 compute (...), 16 threads, SDPA attention``."""
        name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        return f"auto: {name} compute ({self.reason}), {self.threads} threads, SDPA attention"


def auto_choice(device: torch.device, flags: frozenset[str] | None = None) -> AutoChoice:
    """The compute precision ``auto`` means on ``device`` (see the module doc)."""
    threads = torch.get_num_threads()
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8:
            return AutoChoice(torch.bfloat16, threads, f"GPU compute capability {major}.x computes bf16 natively")
        return AutoChoice(torch.float16, threads, "GPU before compute capability 8.0: fp16 tensor cores")
    if native_bf16_cpu(flags):
        return AutoChoice(torch.bfloat16, threads, "CPU has AVX512-BF16/AMX")
    return AutoChoice(torch.float32, threads, "CPU has no AVX512-BF16/AMX, where bf16 would be emulated and slower")
