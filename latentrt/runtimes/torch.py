"""The PyTorch runtime: a component's own torch module behind the ``CompiledModule`` interface.

``torch`` runs it eagerly; ``torch_compile`` wraps it in ``torch.compile`` (dynamic shapes, so a
new image size does not recompile; https://pytorch.org/docs/stable/generated/torch.compile.html);
``torch_channels_last`` runs it eagerly with channels-last weights (:mod:`.memory_format`).
Nothing is exported or cached: the weights already in memory are what runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from latentrt.core.errors import RuntimeUnavailable
from latentrt.core.protocols import CompileRequest, ExportSpec
from latentrt.runtimes.memory_format import to_channels_last

__all__ = ["TorchModule", "TorchRuntime", "torch_channels_last_runtime", "torch_compile_runtime"]


class TorchModule:
    """A torch module taking the spec's inputs positionally; named tensors in, named tensors out."""

    def __init__(self, module: nn.Module | Any, spec: ExportSpec) -> None:
        self.module = module
        self.spec = spec

    def __call__(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check the feeds against the spec's range, then run the module once."""
        self.spec.check_feeds(feeds)
        with torch.inference_mode():
            out = self.module(*(feeds[name] for name in self.spec.input_names))
        values = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.spec.output_names, values, strict=True))


@dataclass
class TorchRuntime:
    """Eager PyTorch, or ``torch.compile`` with ``compile_mode`` (``"default"``, ``"reduce-overhead"``, ...)
    and ``backend`` (``"inductor"``; a mode applies to inductor only); ``channels_last`` converts the
    module's 4-D weights to channels-last first."""

    name: str = "torch"
    compile_mode: str | None = None
    backend: str = "inductor"
    channels_last: bool = False

    def available(self) -> bool:
        """Always: torch is a dependency (``torch.compile`` needs torch 2)."""
        return self.compile_mode is None or hasattr(torch, "compile")

    def version(self) -> str:
        """The torch version."""
        return str(torch.__version__)

    def compile(self, request: CompileRequest) -> TorchModule:
        """The component's module on ``request.device``, compiled when a mode is set."""
        if not self.available():
            raise RuntimeUnavailable(f"torch {torch.__version__} has no torch.compile; use the torch runtime")
        module: Any = request.component.module.to(request.device).eval()
        if self.channels_last:
            to_channels_last(module)
        if self.compile_mode is not None:
            mode = self.compile_mode if self.backend == "inductor" else None
            module = torch.compile(module, backend=self.backend, mode=mode, dynamic=True)
        return TorchModule(module, request.component.spec)


def torch_compile_runtime() -> TorchRuntime:
    """The ``torch_compile`` runtime: ``torch.compile`` in its default mode."""
    return TorchRuntime(name="torch_compile", compile_mode="default")


def torch_channels_last_runtime() -> TorchRuntime:
    """The ``torch_channels_last`` runtime: eager PyTorch over channels-last weights."""
    return TorchRuntime(name="torch_channels_last", channels_last=True)
