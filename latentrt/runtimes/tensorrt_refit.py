"""Refitting a TensorRT engine: new weights of the same architecture, without a rebuild (the LoRA path).

``trt.Refitter`` replaces an engine's weights by name (``set_named_weights``, here from device memory,
``TensorLocation.DEVICE``) and applies them with ``refit_cuda_engine``; weights TensorRT fused with
others must all be given, or ``get_missing_weights`` lists them (TensorRT developer guide,
"Refitting an Engine"). Names come from the engine's refit map (:mod:`latentrt.exporters.tensorrt_refit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from latentrt.core.errors import ExportError
from latentrt.exporters.tensorrt_build import torch_dtype, trt_logger
from latentrt.exporters.tensorrt_refit import RefitMap, weight_tensor

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["RefitReport", "refit_engine"]


@dataclass(frozen=True)
class RefitReport:
    """What a refit changed: engine weights replaced, and the state-dict keys no engine weight comes from."""

    updated: int
    unused: tuple[str, ...]


def _set_weights(
    refitter: trt.Refitter, mapping: RefitMap, state_dict: Mapping[str, Tensor], device: torch.device
) -> list[Tensor]:
    """Give the refitter every mapped weight ``state_dict`` holds; the tensors must live until the refit is done."""
    import tensorrt as trt

    kept: list[Tensor] = []
    for name in refitter.get_all_weights():
        source = mapping.weights.get(name)
        if source is None or source.parameter not in state_dict:
            continue
        prototype = refitter.get_weights_prototype(name)
        tensor = weight_tensor(state_dict[source.parameter], source, torch_dtype(prototype.dtype), device)
        weights = trt.Weights(prototype.dtype, tensor.data_ptr(), tensor.numel())
        if not refitter.set_named_weights(name, weights, trt.TensorLocation.DEVICE):
            raise ExportError(f"TensorRT refused new weights for {name} (from {source.parameter})")
        kept.append(tensor)
    return kept


def refit_engine(
    engine: trt.ICudaEngine, mapping: RefitMap, state_dict: Mapping[str, Tensor], device: torch.device
) -> RefitReport:
    """Replace ``engine``'s weights with those in ``state_dict`` (keys as the component's state dict)."""
    import tensorrt as trt

    with torch.cuda.device(device):
        refitter = trt.Refitter(engine, trt_logger())
        kept = _set_weights(refitter, mapping, state_dict, device)
        missing = refitter.get_missing_weights()
        if missing:
            raise ExportError(
                f"refit needs {len(missing)} more weights than given (e.g. {', '.join(missing[:3])}); "
                "pass the component's full state dict"
            )
        if not refitter.refit_cuda_engine():
            raise ExportError("TensorRT could not refit the engine (its log above says why)")
    used = {source.parameter for source in mapping.weights.values()}
    return RefitReport(len(kept), tuple(key for key in state_dict if key not in used))
