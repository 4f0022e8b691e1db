"""Which state-dict entry each weight of a refittable TensorRT engine comes from (the refit map).

A refittable engine (``BuilderFlag.REFIT``) names its weights after the ONNX graph's initializers
(``trt.Refitter.get_all_weights``), and ``Refitter.set_named_weights`` replaces them by those names
(TensorRT developer guide, "Refitting an Engine"). The ONNX exporter names an initializer after the
parameter it holds (``module.`` + the component's state-dict key), except where the exporter's
constant folding made a new one from a parameter: a reshaped GroupNorm scale (``[C]`` -> ``[C, 1, 1]``)
or a transposed linear weight. Those are found by value: an initializer whose bytes equal exactly
one parameter's, as stored or transposed, comes from that parameter. Initializers equal to several
parameters (``ambiguous``) or to none (constants such as the timestep frequencies) are left out;
refitting replaces only the mapped ones. The map is written beside the engine as ``refit_map.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentrt.core.errors import ExportError

__all__ = ["PREFIX", "RefitMap", "WeightSource", "onnx_initializers", "refit_map", "weight_tensor"]

PREFIX = "module."
"""What the ONNX exporter puts before a component's state-dict keys (its positional wrapper's attribute)."""
REFIT_FORMAT = 1


@dataclass(frozen=True)
class WeightSource:
    """An engine weight's origin: ``parameter`` (a state-dict key), transposed or not, reshaped to ``shape``."""

    parameter: str
    shape: tuple[int, ...]
    transpose: bool = False


@dataclass(frozen=True)
class RefitMap:
    """Engine weight name -> :class:`WeightSource`; ``ambiguous`` initializers equal several parameters."""

    weights: Mapping[str, WeightSource]
    ambiguous: tuple[str, ...] = ()
    constants: int = 0
    unmapped_parameters: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """The map as JSON data (``refit_map.json``)."""
        return {
            "format": REFIT_FORMAT,
            "weights": {
                name: {"parameter": s.parameter, "shape": list(s.shape), "transpose": s.transpose}
                for name, s in self.weights.items()
            },
            "ambiguous": list(self.ambiguous),
            "constants": self.constants,
            "unmapped_parameters": list(self.unmapped_parameters),
        }

    @staticmethod
    def read(path: Path) -> RefitMap:
        """The map in ``path``; an ExportError naming the fix when it is missing or malformed."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != REFIT_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {REFIT_FORMAT}")
            weights = {
                str(name): WeightSource(str(s["parameter"]), tuple(int(d) for d in s["shape"]), bool(s["transpose"]))
                for name, s in data["weights"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ExportError(f"{path}: no usable refit map ({exc}); build the engine again, refittable") from exc
        return RefitMap(weights, tuple(data.get("ambiguous", ())), int(data.get("constants", 0)))


def _digest(array: np.ndarray) -> tuple[str, int, str]:
    """A key equal for arrays with the same dtype and bytes in C order, whatever their shapes."""
    data = np.ascontiguousarray(array)
    return str(data.dtype), data.size, hashlib.blake2b(data.tobytes(), digest_size=20).hexdigest()


def _by_value(parameters: Mapping[str, Tensor], dtypes: set[str]) -> dict[tuple[str, int, str], set[tuple[str, bool]]]:
    """Every parameter's digest in each of ``dtypes``, as stored and (2-D ones) transposed."""
    index: dict[tuple[str, int, str], set[tuple[str, bool]]] = {}
    for key, value in parameters.items():
        for dtype in dtypes:
            array = value.detach().to("cpu", getattr(torch, dtype)).numpy()
            index.setdefault(_digest(array), set()).add((key, False))
            if array.ndim == 2:
                index.setdefault(_digest(array.T), set()).add((key, True))
    return index


def refit_map(
    initializers: Mapping[str, np.ndarray], parameters: Mapping[str, Tensor], prefix: str = PREFIX
) -> RefitMap:
    """Map ONNX ``initializers`` (name -> array) to the component's ``parameters`` (state-dict key -> tensor):
    by name first (``prefix`` + key, same element count), then by value (see the module docstring)."""
    weights: dict[str, WeightSource] = {}
    rest: dict[str, np.ndarray] = {}
    for name, array in initializers.items():
        key = name.removeprefix(prefix) if name.startswith(prefix) else None
        if key is not None and key in parameters and parameters[key].numel() == array.size:
            weights[name] = WeightSource(key, tuple(array.shape))
        elif array.dtype.kind == "f":
            rest[name] = array
    index = _by_value(parameters, {str(a.dtype) for a in rest.values()}) if rest else {}
    ambiguous, constants = [], 0
    for name, array in rest.items():
        sources = index.get(_digest(array), set())
        if len(sources) == 1:
            (key, transposed), *_ = sources
            weights[name] = WeightSource(key, tuple(array.shape), transposed)
        elif sources:
            ambiguous.append(name)
        else:
            constants += 1
    used = {source.parameter for source in weights.values()}
    unmapped = tuple(key for key in parameters if key not in used)
    return RefitMap(weights, tuple(ambiguous), constants, unmapped)


def onnx_initializers(path: Path) -> dict[str, np.ndarray]:
    """The initializers of the ONNX file at ``path`` (external data beside it loaded), by name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def weight_tensor(value: Tensor, source: WeightSource, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as the engine weight ``source`` describes: transposed if so, reshaped, in ``dtype`` on
    ``device``, contiguous (TensorRT reads it by pointer)."""
    tensor = value.detach()
    if source.transpose:
        tensor = tensor.t()
    count = int(np.prod(source.shape)) if source.shape else 1
    if tensor.numel() != count:
        raise ExportError(
            f"refit: {source.parameter} has {tensor.numel()} values, the engine weight takes {count} "
            f"(shape {list(source.shape)}); a different architecture needs a new engine"
        )
    return tensor.reshape(source.shape).to(device=device, dtype=dtype).contiguous()
