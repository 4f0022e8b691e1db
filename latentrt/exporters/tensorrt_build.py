"""TensorRT's builder API, called from :mod:`latentrt.exporters.tensorrt`: an ONNX file -> a serialized engine.

``build_engine`` parses the ONNX with ``trt.OnnxParser.parse_from_file`` (external data beside the file
is found by path), adds one optimization profile per range (``Builder.create_optimization_profile``,
``IOptimizationProfile.set_shape``, ``IBuilderConfig.add_optimization_profile``), sets the precision
flags or builds a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), the
workspace limit (``set_memory_pool_limit``) and refit (``BuilderFlag.REFIT``), loads and saves the
timing cache (``create_timing_cache``, ``set_timing_cache``, ``ITimingCache.serialize``), shows the
build phases as progress bars (``IProgressMonitor``) and calls ``Builder.build_serialized_network``
(https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html).

Also here, shared with the runtime: the check that TensorRT itself is installed, its version, one
logger forwarding TensorRT's messages to ``logging``, and TensorRT -> torch dtypes. ``tensorrt`` is
imported inside functions only, so this module imports without it; ``tools/check_tensorrt_types.py``
type-checks it against the ``tensorrt-stubs`` package.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from latentrt.core.errors import ExportError, RuntimeUnavailable
from latentrt.exporters.tensorrt_plan import BuildPlan, Profile

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "INSTALL",
    "BuildSettings",
    "build_engine",
    "require_tensorrt",
    "tensorrt_installed",
    "tensorrt_version",
    "torch_dtype",
    "trt_logger",
]

logger = logging.getLogger(__name__)

INSTALL = "pip install 'latentrt[gpu]'"


def tensorrt_installed() -> bool:
    """Whether the real ``tensorrt`` package (not only its type stubs) is importable."""
    try:
        require_tensorrt()
    except RuntimeUnavailable:
        return False
    return True


def require_tensorrt() -> None:
    """Raise RuntimeUnavailable unless the real ``tensorrt`` package (not only its type stubs) imports."""
    if importlib.util.find_spec("tensorrt") is None:
        raise RuntimeUnavailable(f"TensorRT is not installed: {INSTALL} on a machine with an NVIDIA GPU")
    import tensorrt

    if not hasattr(tensorrt, "Builder"):  # tensorrt-stubs alone leaves an empty namespace package
        raise RuntimeUnavailable(f"only TensorRT's type stubs are installed, not TensorRT: {INSTALL}")


def tensorrt_version() -> str:
    """The installed TensorRT version (``trt.__version__``)."""
    require_tensorrt()
    import tensorrt as trt

    return str(trt.__version__)


@functools.lru_cache(maxsize=1)
def trt_logger() -> trt.ILogger:
    """One logger for every builder, runtime and refitter, forwarding TensorRT's messages to ``logging``
    (``trt.ILogger`` subclass: the base ``__init__`` must be called, per the ILogger docs)."""
    import tensorrt as trt

    levels = {
        trt.ILogger.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.ERROR: logging.ERROR,
        trt.ILogger.WARNING: logging.WARNING,
    }

    class PythonLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            logger.log(levels.get(severity, logging.DEBUG), "TensorRT: %s", msg)

    return PythonLogger()


def torch_dtype(dtype: trt.DataType) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type."""
    import tensorrt as trt

    dtypes = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in dtypes:
        raise ExportError(f"the engine has a tensor of type {dtype}, which latentrt cannot feed from torch")
    return dtypes[dtype]


def _progress_monitor() -> trt.IProgressMonitor:
    """Nested progress bars over TensorRT's build phases (``IProgressMonitor``, TensorRT 10)."""
    import tensorrt as trt

    class Bars(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm[Any]] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            position = len(self.bars) + 1
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=position, leave=False)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Bars()


@dataclass(frozen=True)
class BuildSettings:
    """Builder settings other than precision: workspace bytes, timing cache file, profile copies, progress."""

    workspace: int | None = None
    timing_cache: Path | None = None
    streams: int = 1
    progress: bool = True


def _parse(builder: trt.Builder, onnx_path: Path, plan: BuildPlan) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """The network TensorRT's ONNX parser reads from ``onnx_path`` (strongly typed when the plan says so),
    and the parser, which owns the network's weights and must live until the build is done."""
    import tensorrt as trt

    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors or 'no details'}")
    return network, parser


def _configure(
    builder: trt.Builder, plan: BuildPlan, profiles: Sequence[Profile], settings: BuildSettings
) -> trt.IBuilderConfig:
    """Builder config: precision flags, refit, workspace, one profile per range (times ``streams``)."""
    import tensorrt as trt

    config = builder.create_builder_config()
    if plan.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers in fp32 (see BuildPlan)
    if plan.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if settings.workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace)
    for _ in range(settings.streams):
        for profile in profiles:
            optimization = builder.create_optimization_profile()
            for name, (low, opt, high) in profile.shapes.items():
                optimization.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
            config.add_optimization_profile(optimization)
    if settings.progress:
        config.progress_monitor = _progress_monitor()
    return config


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    """Start from the timing cache in ``path`` (an empty one when there is none or it is unreadable)."""
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        logger.warning("TensorRT timing cache %s does not fit this TensorRT or GPU; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    """Write the build's timing cache (the loaded entries plus the new ones) through a temp file and a rename."""
    if path is None:
        return
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except OSError as exc:  # a lost timing cache only makes the next build slower
        logger.warning("could not save the TensorRT timing cache %s: %s", path, exc)


def build_engine(onnx_path: Path, profiles: Sequence[Profile], plan: BuildPlan, settings: BuildSettings) -> bytes:
    """A serialized engine (a plan) for the ONNX model at ``onnx_path``."""
    import tensorrt as trt

    builder = trt.Builder(trt_logger())
    network, parser = _parse(builder, onnx_path, plan)
    config = _configure(builder, plan, profiles, settings)
    _load_timing_cache(config, settings.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (its log above says why)")
    _save_timing_cache(config, settings.timing_cache)
    del parser  # kept alive until here: the network's weights live in it
    return bytes(memoryview(serialized))
