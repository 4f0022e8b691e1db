"""``dtype="auto"``: the fastest correct compute precision for the device at hand, said out loud.

* CUDA: fp16 (bf16 on GPUs that compute it natively, compute capability 8.0 and newer, where
  it avoids fp16's overflow in the SDXL VAE at the same speed);
* CPU: bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: ``avx512_bf16`` /
  ``amx_bf16`` in ``/proc/cpuinfo``; oneDNN then runs bf16 matmuls and convolutions about twice
  as fast as fp32), otherwise fp32: without those instructions bf16 is emulated and slower.

Attention always goes through ``scaled_dot_product_attention`` (fused kernels, no
``tokens x tokens`` matrix); the thread count stays torch's default (one per core).

``runtime="auto"`` (:func:`auto_runtime`) puts the UNet, where nearly all the time goes, on ONNX
Runtime on CPUs when it is installed: measured on the full-size SD 1.5 UNet, batch 2, 2 cores
(``benchmarks/results/unet_vs_diffusers.md``), it takes 0.67x eager torch's time at 256x256 and
0.75x at 512x512. Without onnxruntime the UNet runs eagerly with channels-last convolution weights
(0.91x / 0.97x). On CUDA the components stay on eager torch: TensorRT and CUDA graphs are chosen by
name (``--runtime tensorrt``, ``unet=torch_cuda_graphs``) until they have been measured on a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["AutoChoice", "AutoRuntime", "auto_choice", "auto_runtime", "cpu_flags", "native_bf16_cpu"]

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


@dataclass(frozen=True)
class AutoRuntime:
    """What ``runtime="auto"`` picked for each component (None: all on eager torch), and why."""

    plan: dict[str, str] | None
    reason: str

    def describe(self) -> str:
        """``auto runtime: unet on onnxruntime (...)``."""
        placed = ", ".join(f"{name} on {runtime}" for name, runtime in (self.plan or {}).items()) or "torch"
        return f"auto runtime: {placed} ({self.reason})"


def auto_runtime(device: torch.device, compilable: bool, memory_options: bool = False) -> AutoRuntime:
    """The runtime plan ``auto`` means on ``device`` for a model whose components can (``compilable``)
    or cannot be compiled; memory options (``storage_dtype``, ``offload``) keep everything on torch."""
    if memory_options:
        return AutoRuntime(None, "storage_dtype/offload apply to torch components")
    if not compilable:
        return AutoRuntime(None, "this model family runs on torch only")
    if device.type != "cpu":
        return AutoRuntime(None, "on GPUs eager torch; name --runtime tensorrt to build engines")
    if importlib.util.find_spec("onnxruntime") is None:
        return AutoRuntime(
            {"unet": "torch_channels_last"},
            "channels-last convolutions, 0.91-0.97x eager's time; pip install 'latentrt[onnx]' for ONNX Runtime",
        )
    return AutoRuntime({"unet": "onnxruntime"}, "0.67x eager torch's UNet time at 256x256, 0.75x at 512x512")
