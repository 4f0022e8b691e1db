"""Runtimes: what runs a model component (DESIGN.md section 4), and the built-in plugin registering them.

* ``torch``: the component's torch module, eager; ``torch_compile``: the same through ``torch.compile``;
  ``torch_channels_last``: eager with channels-last weights (:mod:`latentrt.runtimes.memory_format`);
* ``torch_cuda_graphs``: eager torch replayed from one CUDA graph per input shape, eager off CUDA
  (:mod:`latentrt.runtimes.cuda_graphs`); ``torch_cuda_graphs_channels_last``: the same over
  channels-last weights;
* ``onnxruntime``: the ONNX export of the component (:mod:`latentrt.exporters.onnx`), built on first
  use into the engine cache (:mod:`latentrt.exporters.cache`), run by ONNX Runtime;
* ``tensorrt``: a TensorRT engine built from that ONNX export (:mod:`latentrt.exporters.tensorrt`),
  cached per GPU and TensorRT version, run on torch's CUDA tensors (:mod:`latentrt.runtimes.tensorrt`).

``latentrt.load(path, runtime="onnxruntime")`` runs every component on one runtime;
``runtime={"unet": "onnxruntime", "vae_decoder": "torch"}`` chooses per component. The
optional packages (onnx, onnxruntime, tensorrt) are imported only when a runtime or exporter is used.
"""

from __future__ import annotations

from latentrt.core.hookspecs import hookimpl
from latentrt.core.registry import Registry

__all__ = ["latentrt_register"]


@hookimpl
def latentrt_register(registry: Registry) -> None:
    """Register the ``onnx`` and ``tensorrt`` exporters and the ``torch``, ``torch_compile``,
    ``torch_channels_last``, ``torch_cuda_graphs`` (and its channels-last variant), ``onnxruntime`` and
    ``tensorrt`` runtimes."""
    from latentrt.exporters.onnx import OnnxExporter
    from latentrt.exporters.tensorrt import TensorRTExporter
    from latentrt.runtimes.cuda_graphs import CudaGraphRuntime, cuda_graphs_channels_last_runtime
    from latentrt.runtimes.onnxruntime import OnnxRuntime
    from latentrt.runtimes.tensorrt import TensorRTRuntime
    from latentrt.runtimes.torch import TorchRuntime, torch_channels_last_runtime, torch_compile_runtime

    registry.add_exporter("onnx", OnnxExporter, description="ONNX (opset 18), validated against torch")
    registry.add_runtime("torch", TorchRuntime, label="PyTorch", description="eager PyTorch")
    registry.add_runtime("torch_compile", torch_compile_runtime, label="torch.compile")
    registry.add_runtime(
        "torch_channels_last",
        torch_channels_last_runtime,
        label="PyTorch channels-last",
        description="eager PyTorch with channels-last (NHWC) convolution weights",
    )
    registry.add_runtime(
        "torch_cuda_graphs",
        CudaGraphRuntime,
        label="PyTorch CUDA graphs",
        description="eager PyTorch replayed from one CUDA graph per input shape; eager off CUDA",
    )
    registry.add_runtime(
        "torch_cuda_graphs_channels_last",
        cuda_graphs_channels_last_runtime,
        label="PyTorch CUDA graphs, channels-last",
        description="CUDA graphs over channels-last (NHWC) convolution weights; eager off CUDA",
    )
    registry.add_runtime("onnxruntime", OnnxRuntime, label="ONNX Runtime", aliases=("ort",))
    registry.add_exporter("tensorrt", TensorRTExporter, description="TensorRT engines built from the ONNX export")
    registry.add_runtime(
        "tensorrt",
        TensorRTRuntime,
        label="TensorRT",
        aliases=("trt",),
        description="TensorRT engines on an NVIDIA GPU; needs TensorRT and CUDA: pip install 'latentrt[gpu]'",
    )
