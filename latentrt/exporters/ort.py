"""ONNX Runtime sessions, and the check of an exported model against its torch module.

Validation (DESIGN.md section 4; REFERENCE.md pain point 9, "exported models that drift from
PyTorch with no report of how far"): the exported file runs on the spec's sample inputs at the two
shapes of :func:`validation_dims`, and every output is compared with the torch module's. An output
passes when ``max |onnx - torch| <= tolerance * max(1, max |torch|)`` and every value is finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from latentrt.core.errors import ExportError
from latentrt.core.protocols import ExportSpec

__all__ = ["LEVELS", "device_of", "external_bytes", "failure_summary", "ort_session", "validate", "validation_dims"]

LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def ort_session(
    path: Path,
    providers: Sequence[str | tuple[str, dict[str, Any]]],
    *,
    level: str,
    threads: int,
    save_to: Path | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` at optimization ``level`` (a key of :data:`LEVELS`).

    ``save_to`` writes the optimized graph there (weights beside it in ``<name>.data`` when the
    model is too large for one protobuf).
    """
    import onnxruntime as ort

    if level not in LEVELS:
        raise ExportError(f"graph optimization level must be one of {', '.join(LEVELS)}, got {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the CPU provider warns about every unassigned node
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
        if external_bytes(path) > 0:  # large models: keep the optimized weights external too
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", save_to.name + ".data"
            )
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(path), options, providers=list(providers))


def external_bytes(path: Path) -> int:
    """Bytes in the external data file beside ``path`` (``<name>.data``), 0 when there is none."""
    data = path.with_name(path.name + ".data")
    return data.stat().st_size if data.exists() else 0


def validation_dims(spec: ExportSpec) -> list[dict[str, int]]:
    """The two shapes an export is checked at: the smallest, then the optimal batch (at least 2
    when the range allows) and height at the smallest width (non-square catches transposes)."""
    smallest = {name: lo for name, (lo, _, _) in spec.shape_range.items()}
    second = {name: opt for name, (_, opt, _) in spec.shape_range.items()}
    if "batch" in spec.shape_range:
        _, opt, hi = spec.shape_range["batch"]
        second["batch"] = min(hi, max(2, opt))
    if "width" in spec.shape_range:
        second["width"] = spec.shape_range["width"][0]
    if second == smallest:
        second = {name: hi for name, (_, _, hi) in spec.shape_range.items()}
    return [smallest, second]


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _outputs(module: nn.Module, spec: ExportSpec, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Run ``module`` on ``feeds`` (positional, in spec order) and name its outputs."""
    with torch.inference_mode():
        out = module(*(feeds[name] for name in spec.input_names))
    values = out if isinstance(out, tuple) else (out,)
    if len(values) != len(spec.output_names):
        raise ExportError(f"{spec.name} returned {len(values)} outputs, its spec names {len(spec.output_names)}")
    return {name: value.float().cpu() for name, value in zip(spec.output_names, values, strict=True)}


def validate(module: nn.Module, spec: ExportSpec, session: Any, tolerance: float, file: str) -> dict[str, Any]:
    """Run ``session`` and ``module`` on the spec's sample inputs at :func:`validation_dims`; the report
    per shape and output (max abs difference, max |torch|, allowed difference, passed)."""
    assert spec.sample_inputs is not None
    device = device_of(module)
    runs, finite, passed = [], True, True
    for dims in validation_dims(spec):
        feeds = spec.sample_inputs(dims)
        expected = _outputs(module, spec, {k: v.to(device) for k, v in feeds.items()})
        got = session.run(list(spec.output_names), {k: v.numpy() for k, v in feeds.items()})
        report = {}
        for (name, reference), array in zip(expected.items(), got, strict=True):
            value = torch.from_numpy(array).float()
            diff = float((value - reference).abs().max()) if value.shape == reference.shape else float("inf")
            largest = float(reference.abs().max())
            allowed = tolerance * max(1.0, largest)
            finite &= bool(torch.isfinite(value).all())
            passed &= diff <= allowed
            report[name] = {
                "max_abs_diff": diff,
                "max_abs_reference": largest,
                "tolerance": allowed,
                "passed": diff <= allowed,
            }
        runs.append({"dims": dims, "outputs": report})
    rule = f"max |onnx - torch| <= {tolerance} * max(1, max |torch|) per output"
    return {"passed": passed and finite, "finite": finite, "rule": rule, "file": file, "runs": runs}


def failure_summary(validation: Mapping[str, Any]) -> str:
    """One line naming the worst output of a failed validation."""
    if not validation["finite"]:
        return "the exported model produced NaN/inf on the sample inputs"
    worst = max(
        ((run["dims"], name, r) for run in validation["runs"] for name, r in run["outputs"].items()),
        key=lambda item: item[2]["max_abs_diff"] / item[2]["tolerance"],
    )
    dims, name, report = worst
    return (
        f"output {name} differs from torch by {report['max_abs_diff']:.3g} at {dims}, "
        f"over its tolerance {report['tolerance']:.3g}"
    )
