"""What a TensorRT engine is built for, decided without TensorRT: profiles, precision, the GPU it is tied to.

Everything here is plain Python, unit-tested on machines without a GPU;
:mod:`latentrt.exporters.tensorrt` turns it into TensorRT builder calls and
:mod:`latentrt.runtimes.tensorrt` runs the result.

* **Optimization profiles** (TensorRT developer guide, "Working with Dynamic Shapes"): one per
  requested shape range, each giving every input tensor a min/opt/max shape
  (``IOptimizationProfile.set_shape``). Ranges come in the spec's units (pixels for spatial axes,
  :class:`~latentrt.core.protocols.ExportSpec`), are divided by the tensor's ``pixel_scale`` (SD
  latents are 1/8 of the image), and static axes keep the ONNX graph's size. Dynamic axes the spec
  leaves unbounded (the UNet's ``tokens``) take :data:`UNBOUNDED` ranges. A static engine has
  min = opt = max = the optimum.
* **Precision** (developer guide, "Reduced Precision"): fp32; fp16 or bf16 through builder flags on
  an fp32 network (TensorRT picks per-layer precision); or a strongly typed network parsed from an
  fp16 ONNX, whose types TensorRT keeps as written.
* **What an engine is tied to**: a plan runs only on the TensorRT version and GPU architecture
  it was built with (developer guide, "Engine compatibility"), so both are in the engine-cache key
  and in the manifest, and checked before a plan is deserialized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from latentrt.core.errors import ExportError, InvalidRequest
from latentrt.core.protocols import ExportSpec

__all__ = [
    "ENGINE",
    "REFIT_MAP",
    "TOLERANCE",
    "UNBOUNDED",
    "BuildPlan",
    "EngineLayout",
    "Profile",
    "bf16_supported",
    "build_plan",
    "derive_profiles",
    "device_tag",
    "engine_mismatch",
    "fallback_plan",
    "profile_ranges",
    "request_sizes",
    "select_profile",
    "timing_cache_path",
]

Range = tuple[int, int, int]
Shape = tuple[int, ...]

ENGINE, REFIT_MAP = "engine.plan", "refit_map.json"
UNBOUNDED: Mapping[str, Range] = {"tokens": (77, 77, 231)}
"""Ranges of dynamic axes a spec leaves unbounded: 1 to 3 prompt chunks of 77 tokens (225 prompt tokens)."""
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}
"""Allowed max abs difference to torch, relative to ``max(1, max |torch output|)`` (bf16 keeps 8 mantissa bits)."""
REBUILD = "latentrt export --to tensorrt --device cuda with --min-size/--max-size/--max-batch"


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the ranges it covers (the spec's units) and min/opt/max per input tensor."""

    ranges: Mapping[str, Range]
    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def describe(self) -> str:
        """``batch 1..4, height 256..1024, ...`` for messages."""
        return ", ".join(f"{name} {lo}..{hi}" for name, (lo, _, hi) in self.ranges.items())

    def fits(self, shapes: Mapping[str, Shape]) -> bool:
        """Whether every input shape lies within this profile's min and max."""
        for name, (low, _, high) in self.shapes.items():
            shape = shapes.get(name)
            if shape is None or len(shape) != len(low):
                return False
            if not all(lo <= size <= hi for lo, size, hi in zip(low, shape, high, strict=True)):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        """The profile as manifest JSON."""
        return {
            "ranges": {name: list(bounds) for name, bounds in self.ranges.items()},
            "shapes": {name: [list(s) for s in bounds] for name, bounds in self.shapes.items()},
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Profile:
        """The profile :meth:`to_json` wrote."""
        try:
            ranges = {str(k): (int(lo), int(opt), int(hi)) for k, (lo, opt, hi) in data["ranges"].items()}
            shapes = {str(k): (tuple(lo), tuple(opt), tuple(hi)) for k, (lo, opt, hi) in data["shapes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExportError(f"a TensorRT manifest's profile is malformed ({exc}); build the engine again") from exc
        return Profile(ranges, shapes)


def _symbols(spec: ExportSpec) -> list[str]:
    """The symbols of the spec's input axes, in first-use order."""
    seen: dict[str, None] = {}
    for name in spec.input_names:
        for symbol in spec.dynamic_axes.get(name, {}).values():
            seen.setdefault(symbol, None)
    return list(seen)


def _inside(inner: Range, outer: Range) -> bool:
    return outer[0] <= inner[0] <= inner[1] <= inner[2] <= outer[2]


def profile_ranges(
    spec: ExportSpec,
    requested: Sequence[Mapping[str, Range]] = (),
    *,
    static: bool = False,
    unbounded: Mapping[str, Range] = UNBOUNDED,
) -> list[dict[str, Range]]:
    """The symbol ranges of each profile: the spec's own, then one per ``requested`` range (inside the spec's).

    ``static`` collapses every range to its optimum.
    """
    base: dict[str, Range] = {}
    for symbol in _symbols(spec):
        bounds = spec.shape_range.get(symbol, unbounded.get(symbol))
        if bounds is None:
            raise ExportError(
                f"{spec.name}: dynamic axis {symbol!r} has no range; TensorRT needs min/opt/max for every "
                f"dynamic axis (give it in the runtime's unbounded ranges)"
            )
        base[symbol] = bounds
    profiles = [base]
    for extra in requested:
        merged = {**base, **extra}
        outside = [k for k in merged if k not in base or (k in spec.shape_range and not _inside(merged[k], base[k]))]
        if outside:
            raise ExportError(
                f"{spec.name}: profile {', '.join(f'{k} {merged[k]}' for k in outside)} is outside the compiled "
                f"range ({spec.describe_range()}); widen the range with --min-size/--max-size/--max-batch"
            )
        profiles.append(merged)
    if static:
        profiles = [{k: (opt, opt, opt) for k, (_, opt, _) in ranges.items()} for ranges in profiles]
    return profiles


def _axis_bounds(spec: ExportSpec, tensor: str, symbol: str, bounds: Range) -> Range:
    """``bounds`` of ``symbol`` in ``tensor``'s own units (spatial sizes divided by its pixel scale)."""
    scale = 1 if symbol == "batch" else spec.pixel_scale.get(tensor, 1)
    if any(b % scale for b in bounds):
        raise ExportError(
            f"{spec.name}: {symbol} {bounds[0]}..{bounds[2]} (optimum {bounds[1]}) must be multiples of {scale} "
            f"for input {tensor}; choose sizes divisible by {scale}"
        )
    lo, opt, hi = (b // scale for b in bounds)
    return lo, opt, hi


def derive_profiles(
    spec: ExportSpec, graph_inputs: Mapping[str, Sequence[int | str]], ranges: Sequence[Mapping[str, Range]]
) -> list[Profile]:
    """One :class:`Profile` per entry of ``ranges`` for the ONNX graph's inputs (name -> dims, ints static)."""
    profiles = []
    for symbol_ranges in ranges:
        shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
        for name, dims in graph_inputs.items():
            axes = spec.dynamic_axes.get(name, {})
            bounds: list[Range] = []
            for axis, dim in enumerate(dims):
                symbol = axes.get(axis)
                if symbol is not None:
                    bounds.append(_axis_bounds(spec, name, symbol, symbol_ranges[symbol]))
                elif isinstance(dim, int) and dim > 0:
                    bounds.append((dim, dim, dim))
                else:
                    raise ExportError(
                        f"{spec.name}: input {name} axis {axis} is dynamic in the ONNX graph ({dim!r}) but not in "
                        "its export spec; add it to the spec's dynamic_axes"
                    )
            shapes[name] = (tuple(b[0] for b in bounds), tuple(b[1] for b in bounds), tuple(b[2] for b in bounds))
        profiles.append(Profile(dict(symbol_ranges), shapes))
    return profiles


def request_sizes(spec: ExportSpec, shapes: Mapping[str, Shape]) -> dict[str, int]:
    """The sizes a request asks for, by symbol, in the spec's units (``batch 2, height 512, tokens 154``)."""
    sizes: dict[str, int] = {}
    for name, shape in shapes.items():
        for axis, symbol in spec.dynamic_axes.get(name, {}).items():
            if axis < len(shape):
                sizes.setdefault(symbol, spec.axis_size(name, axis, shape[axis]))
    return sizes


def select_profile(profiles: Sequence[Profile], spec: ExportSpec, shapes: Mapping[str, Shape]) -> int:
    """The first profile that fits ``shapes``; an InvalidRequest naming the built ranges when none does."""
    for index, profile in enumerate(profiles):
        if profile.fits(shapes):
            return index
    built = "; ".join(p.describe() for p in profiles)
    sizes = request_sizes(spec, shapes)
    asked = ", ".join(f"{name} {size}" for name, size in sizes.items())
    if any(all(lo <= sizes.get(k, lo) <= hi for k, (lo, _, hi) in p.ranges.items()) for p in profiles):
        expected = ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in profiles[0].shapes.items())
        got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise InvalidRequest(f"{spec.name}: input shapes {got} do not match the TensorRT engine's ({expected})")
    outside = [k for k, size in sizes.items() if not any(_covers(p, k, size) for p in profiles)]
    unbounded = [k for k in outside if k not in spec.shape_range]
    how = REBUILD if not unbounded else f"TensorRTRuntime(unbounded={{{unbounded[0]!r}: (min, opt, max)}})"
    raise InvalidRequest(
        f"{spec.name}: {asked} is outside the TensorRT engine's profiles ({built}); rebuild the engine for it ({how})"
    )


def _covers(profile: Profile, symbol: str, size: int) -> bool:
    lo, _, hi = profile.ranges.get(symbol, (size, size, size))
    return lo <= size <= hi


@dataclass(frozen=True)
class BuildPlan:
    """How an engine is built: its precision, the ONNX it is parsed from, and the TensorRT flags to set.

    Weak typing (``strongly_typed`` False) parses an fp32 ONNX and lets TensorRT choose fp16/bf16
    kernels where ``fp16``/``bf16`` allow (``BuilderFlag.FP16``/``BF16``). A strongly typed network
    (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) keeps the ONNX's types and takes no precision
    flags. ``refit`` sets ``BuilderFlag.REFIT``. TF32 is always cleared (``BuilderFlag.TF32``), so
    layers left in fp32 compute in fp32, as torch's matmuls do by default.
    """

    precision: str
    onnx_precision: str
    strongly_typed: bool = False
    fp16: bool = False
    bf16: bool = False
    refit: bool = False


def build_plan(precision: str, *, strongly_typed: bool = False, refittable: bool = False) -> BuildPlan:
    """The plan for an engine in ``precision`` (``fp32``, ``fp16`` or ``bf16``)."""
    if precision not in TOLERANCE:
        raise ExportError(f"TensorRT precision must be one of {', '.join(TOLERANCE)}, got {precision!r}")
    if strongly_typed:
        if precision == "bf16":
            raise ExportError(
                "a strongly typed bf16 engine needs a bf16 ONNX, which the ONNX exporter does not write; "
                "build bf16 without strong typing"
            )
        return BuildPlan(precision, precision, strongly_typed=True, refit=refittable)
    return BuildPlan(precision, "fp32", fp16=precision == "fp16", bf16=precision == "bf16", refit=refittable)


def fallback_plan(plan: BuildPlan, bf16_ok: bool) -> BuildPlan | None:
    """The wider precision to rebuild a component in whose outputs overflow: fp16 -> bf16 (where the GPU
    has it, weak typing) -> fp32; None when ``plan`` is fp32 already."""
    if plan.precision == "fp32":
        return None
    if plan.precision == "fp16" and bf16_ok and not plan.strongly_typed:
        return replace(plan, precision="bf16", fp16=False, bf16=True)
    return build_plan("fp32", strongly_typed=plan.strongly_typed, refittable=plan.refit)


def bf16_supported(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability has bf16 tensor cores (Ampere, sm80, and newer)."""
    return capability >= (8, 0)


def device_tag(gpu_name: str, capability: tuple[int, int], tensorrt_version: str) -> str:
    """What an engine is tied to, for the engine-cache key: the GPU, its compute capability, the TensorRT version."""
    major, minor = capability
    return f"cuda:{gpu_name}:sm{major}{minor}:tensorrt {tensorrt_version}"


def engine_mismatch(manifest: Mapping[str, Any], tensorrt_version: str, capability: tuple[int, int]) -> str | None:
    """Why an engine described by ``manifest`` cannot be loaded here, or None when it can."""
    built = manifest.get("tensorrt", {})
    version, built_capability = built.get("version"), tuple(built.get("compute_capability", ()))
    if version != tensorrt_version:
        return f"the engine was built with TensorRT {version}, this machine has {tensorrt_version}"
    if built_capability != capability:
        here = "sm{}{}".format(*capability)
        there = "sm" + "".join(str(c) for c in built_capability) if built_capability else "an unknown GPU"
        return f"the engine was built for a {there} GPU, this one is {here}"
    return None


def timing_cache_path(root: Path, tensorrt_version: str, capability: tuple[int, int]) -> Path:
    """The timing cache shared by every build on this TensorRT version and GPU architecture."""
    major, minor = capability
    return root / "tensorrt" / f"timing-{tensorrt_version}-sm{major}{minor}.cache"


@dataclass(frozen=True)
class EngineLayout:
    """What running an engine needs besides the plan: its spec, profiles, input/output names and streams.

    The engine holds ``streams`` copies of each profile, one per concurrently used execution context
    (a profile serves one context at a time): profile ``p`` of context slot ``s`` is engine profile
    ``s * len(profiles) + p``.
    """

    spec: ExportSpec
    profiles: tuple[Profile, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    streams: int = 1

    def profile_index(self, slot: int, profile: int) -> int:
        """The engine profile index of ``profile`` for context ``slot``."""
        return slot * len(self.profiles) + profile

    @staticmethod
    def from_manifest(manifest: Mapping[str, Any], spec: ExportSpec) -> EngineLayout:
        """The layout a TensorRT manifest describes."""
        try:
            profiles = tuple(Profile.from_json(p) for p in manifest["profiles"])
            inputs = tuple(str(i["name"]) for i in manifest["inputs"])
            outputs = tuple(str(o["name"]) for o in manifest["outputs"])
            streams = int(manifest.get("tensorrt", {}).get("streams", 1))
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"the TensorRT manifest is incomplete ({exc!r}); build the engine again") from exc
        return EngineLayout(spec, profiles, inputs, outputs, streams)
