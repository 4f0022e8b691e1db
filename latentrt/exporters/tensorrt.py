"""The TensorRT exporter: a backbone -> its ONNX export -> a TensorRT engine, checked against torch.

Steps (each timed in the manifest, under a progress bar; TensorRT's own build phases show as nested bars):

1. **onnx**: :class:`~latentrt.exporters.onnx.OnnxExporter` without ONNX Runtime's offline
   optimization (its fused nodes are not standard ONNX), validated against torch as usual.
2. **build**: :func:`~.tensorrt_build.build_engine`: TensorRT's ONNX parser, one optimization profile
   per shape range (:mod:`.tensorrt_plan`), precision flags or a strongly typed network, workspace
   limit, refit, and a timing cache loaded before and saved after the build.
3. **validate**: the engine runs on the spec's sample inputs at two shapes against the float32 torch
   module, within :data:`~.tensorrt_plan.TOLERANCE`. A ``keep_fp32`` component (the VAE) whose fp16
   engine overflows is rebuilt in bf16 where the GPU has it, else fp32, and the manifest says so.
4. **refit map** (refittable engines): which state-dict entry each engine weight comes from
   (:mod:`.tensorrt_refit`).

The folder holds ``engine.plan``, ``manifest.json`` and, for refittable engines, ``refit_map.json``;
the ONNX files are dropped once the engine is built. Everything is written to a temporary folder
beside ``out_dir`` and renamed into place at the end. ``tensorrt`` is imported only inside
functions, so latentrt imports without it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from latentrt.core.checkpoint import file_sha256
from latentrt.core.errors import ExportError, RuntimeUnavailable
from latentrt.core.protocols import Artifact, ExportSpec
from latentrt.exporters import MANIFEST, MANIFEST_FORMAT, spec_to_json
from latentrt.exporters.cache import cache_root
from latentrt.exporters.onnx import MODEL, ExportStages, OnnxExporter, float32_eval, move_into_place
from latentrt.exporters.ort import failure_summary, validate
from latentrt.exporters.tensorrt_build import BuildSettings, build_engine, require_tensorrt, tensorrt_version
from latentrt.exporters.tensorrt_plan import (
    ENGINE,
    REFIT_MAP,
    TOLERANCE,
    UNBOUNDED,
    BuildPlan,
    EngineLayout,
    bf16_supported,
    build_plan,
    derive_profiles,
    fallback_plan,
    profile_ranges,
    timing_cache_path,
)
from latentrt.exporters.tensorrt_refit import onnx_initializers, refit_map

__all__ = ["TensorRTExporter", "spec_of"]

logger = logging.getLogger(__name__)

Range = tuple[int, int, int]


class _Session:
    """A compiled module behind ``onnxruntime.InferenceSession.run``'s interface, for :func:`validate`."""

    def __init__(self, module: Any, device: torch.device) -> None:
        self.module, self.device = module, device

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on numpy feeds; numpy outputs in ``names`` order."""
        out: dict[str, Tensor] = self.module({k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()})
        return [out[name].float().cpu().numpy() for name in names]


@dataclass(frozen=True)
class _Built:
    """A built and validated engine: how it was built, its layout, its ONNX's manifest, the validation report."""

    plan: BuildPlan
    layout: EngineLayout
    onnx: Mapping[str, Any]
    validation: dict[str, Any]
    note: str | None


@dataclass
class TensorRTExporter:
    """Builds TensorRT engines from ONNX exports (see the module docstring); implements ``Exporter``.

    ``profiles``: shape ranges beyond the spec's own, one optimization profile each; ``static``: every
    profile at its optimum only; ``unbounded``: ranges of axes the spec leaves open (prompt tokens);
    ``strongly_typed``: parse an fp16 ONNX as a strongly typed network instead of using precision flags;
    ``refittable``: weights replaceable without a rebuild; ``workspace``: builder workspace limit in
    bytes; ``timing_cache``: default ``$LATENTRT_CACHE/tensorrt/timing-<version>-sm<cc>.cache``;
    ``streams``: concurrent execution contexts the engine serves (profile copies).
    """

    name: str = "tensorrt"
    device: str = "cuda"
    profiles: tuple[Mapping[str, Range], ...] = ()
    static: bool = False
    unbounded: Mapping[str, Range] = field(default_factory=lambda: dict(UNBOUNDED))
    strongly_typed: bool = False
    refittable: bool = False
    workspace: int | None = None
    timing_cache: Path | None = None
    streams: int = 1
    keep_fp32: tuple[str, ...] = ("vae_decoder", "vae_encoder")
    tolerance: Mapping[str, float] = field(default_factory=lambda: dict(TOLERANCE))
    progress: bool = True

    def version(self) -> str:
        """TensorRT and ONNX exporter versions and every build setting (part of the engine-cache key)."""
        ranges = "; ".join(", ".join(f"{k} {v}" for k, v in r.items()) for r in self.profiles) or "spec only"
        settings = (
            f"profiles {ranges}; static {self.static}; unbounded {dict(self.unbounded)}; strongly typed "
            f"{self.strongly_typed}; refit {self.refittable}; workspace {self.workspace}; streams {self.streams}"
        )
        return (
            f"tensorrt exporter {MANIFEST_FORMAT} (tensorrt {tensorrt_version()}; {self._onnx().version()}; {settings})"
        )

    def export(
        self,
        backbone: nn.Module,
        spec: ExportSpec,
        out_dir: Path,
        precision: str,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Build ``backbone``'s engine into ``out_dir`` (replacing it), validate it, write ``manifest.json``."""
        require_tensorrt()
        device = torch.device(self.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeUnavailable(f"TensorRT engines are built on a CUDA GPU; {device} is not one here")
        plan = build_plan(precision, strongly_typed=self.strongly_typed, refittable=self.refittable)
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            manifest = self._build(float32_eval(backbone), spec, work, plan, device, dict(metadata or {}))
            move_into_place(work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        artifact = Artifact(out_dir, tuple(manifest["files"]), spec_of(manifest, spec), manifest)
        if manifest["status"] != "ok":
            raise ExportError(f"{spec.name}: {manifest['failure']} (details in {out_dir / MANIFEST})")
        return artifact

    def _onnx(self) -> OnnxExporter:
        """The ONNX exporter the engines are parsed from: plain ONNX (no ONNX Runtime fusions)."""
        import onnxruntime

        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda else ("CPUExecutionProvider",)
        return OnnxExporter(providers=providers, optimization="disabled", progress=self.progress)

    def _build(
        self,
        module: nn.Module,
        spec: ExportSpec,
        work: Path,
        plan: BuildPlan,
        device: torch.device,
        metadata: dict[str, Any],
    ) -> dict[str, Any]:
        """Run the stages in ``work`` (see the module docstring) and return the manifest (written there)."""
        start = time.perf_counter()
        with tqdm(desc=f"tensorrt {spec.name}", unit="stage", disable=not self.progress, leave=False) as bar:
            stages = ExportStages(bar)
            built = self._checked_engine(module, spec, work, plan, device, stages)
            if built.plan.refit:
                with stages.stage("refit map"):
                    mapping = refit_map(onnx_initializers(work / "onnx" / MODEL), dict(module.named_parameters()))
                    (work / REFIT_MAP).write_text(json.dumps(mapping.to_json(), indent=1) + "\n", encoding="utf-8")
            shutil.rmtree(work / "onnx")
            stages.seconds["total"] = round(time.perf_counter() - start, 3)
        logger.info("built the %s TensorRT engine in %.1f s", spec.name, stages.seconds["total"])
        manifest = self._manifest(built, plan.precision, work, stages.seconds)
        manifest["metadata"] = metadata
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return manifest

    def _checked_engine(
        self,
        module: nn.Module,
        spec: ExportSpec,
        work: Path,
        plan: BuildPlan,
        device: torch.device,
        stages: ExportStages,
    ) -> _Built:
        """Export, build and validate ``work/engine.plan``; a ``keep_fp32`` component failing validation is
        built again in a wider precision (:func:`~.tensorrt_plan.fallback_plan`)."""
        capability, note, onnx = torch.cuda.get_device_capability(device), None, None
        while True:
            if onnx is None or onnx.manifest["precision"] != plan.onnx_precision:
                with stages.stage("onnx"):
                    onnx = self._onnx().export(module, spec, work / "onnx", plan.onnx_precision)
            plan = _as_parsed(plan, onnx.manifest["precision"])
            layout = self._layout(spec, onnx.manifest)
            with stages.stage("build"):
                settings = BuildSettings(self.workspace, self._timing_cache(capability), self.streams, self.progress)
                (work / ENGINE).write_bytes(build_engine(work / "onnx" / MODEL, layout.profiles, plan, settings))
            with stages.stage("validate"):
                validation = self._validate(module, work / ENGINE, layout, plan, device)
            wider = fallback_plan(plan, bf16_supported(capability))
            if validation["passed"] or spec.name not in self.keep_fp32 or wider is None:
                return _Built(plan, layout, onnx.manifest, validation, note)
            note = f"built in {wider.precision}: in {plan.precision} {failure_summary(validation)}"
            logger.warning("%s: %s", spec.name, note)
            plan = wider

    def _layout(self, spec: ExportSpec, onnx_manifest: Mapping[str, Any]) -> EngineLayout:
        """Profiles for the ONNX graph's inputs; a static engine's spec narrowed to its optimum."""
        graph_inputs = {i["name"]: i["shape"] for i in onnx_manifest["inputs"]}
        ranges = profile_ranges(spec, self.profiles, static=self.static, unbounded=self.unbounded)
        profiles = tuple(derive_profiles(spec, graph_inputs, ranges))
        if self.static:
            spec = replace(spec, shape_range={k: v for k, v in ranges[0].items() if k in spec.shape_range})
        outputs = tuple(o["name"] for o in onnx_manifest["outputs"])
        return EngineLayout(spec, profiles, tuple(graph_inputs), outputs, self.streams)

    def _timing_cache(self, capability: tuple[int, int]) -> Path:
        return self.timing_cache or timing_cache_path(cache_root(), tensorrt_version(), capability)

    def _validate(
        self, backbone: nn.Module, engine: Path, layout: EngineLayout, plan: BuildPlan, device: torch.device
    ) -> dict[str, Any]:
        """The engine against ``backbone`` on the spec's sample inputs (:func:`~.ort.validate`)."""
        from latentrt.runtimes.tensorrt import TensorRTModule, deserialize_engine  # the runtime runs what we built

        runtime, cuda_engine = deserialize_engine(engine.read_bytes(), device)
        module = TensorRTModule(cuda_engine, runtime, layout, device)
        tolerance = self.tolerance[plan.precision]
        report = validate(backbone, layout.spec, _Session(module, device), tolerance, ENGINE)
        report["rule"] = f"max |tensorrt - torch| <= {tolerance} * max(1, max |torch|) per output"
        return report

    def _manifest(self, built: _Built, requested: str, work: Path, seconds: dict[str, float]) -> dict[str, Any]:
        device, plan, onnx = torch.device(self.device), built.plan, built.onnx
        capability = torch.cuda.get_device_capability(device)
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(work.iterdir()) if p.is_file()
        }
        failure = None if built.validation["passed"] else failure_summary(built.validation)
        return {
            "format": MANIFEST_FORMAT,
            "status": "ok" if failure is None else "failed",
            "failure": failure,
            "component": built.layout.spec.name,
            "exporter": self.name,
            "exporter_version": self.version(),
            "inputs": onnx["inputs"],
            "outputs": onnx["outputs"],
            "shape_range": {k: list(v) for k, v in built.layout.spec.shape_range.items()},
            "spec": spec_to_json(built.layout.spec),
            "profiles": [p.to_json() for p in built.layout.profiles],
            "precision": plan.precision,
            "requested_precision": requested,
            "precision_note": built.note,
            "build": {**asdict(plan), "workspace": self.workspace, "static": self.static},
            "tensorrt": {
                "version": tensorrt_version(),
                "compute_capability": list(capability),
                "gpu": torch.cuda.get_device_name(device),
                "streams": self.streams,
                "refittable": plan.refit,
                "timing_cache": str(self._timing_cache(capability)),
            },
            "model": ENGINE,
            "onnx_validation": onnx["validation"],
            "files": files,
            "tool_versions": {**onnx["tool_versions"], "tensorrt": tensorrt_version()},
            "validation": built.validation,
            "seconds": seconds,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _as_parsed(plan: BuildPlan, onnx_precision: str) -> BuildPlan:
    """A strongly typed plan computes in what the ONNX holds (the ONNX exporter may keep a VAE fp32)."""
    if plan.strongly_typed and onnx_precision != plan.precision:
        return replace(plan, precision=onnx_precision, onnx_precision=onnx_precision)
    return plan


def spec_of(manifest: Mapping[str, Any], spec: ExportSpec) -> ExportSpec:
    """``spec`` with the shape range the engine was built for (narrower for a static engine)."""
    built = {k: (int(lo), int(opt), int(hi)) for k, (lo, opt, hi) in manifest.get("shape_range", {}).items()}
    return replace(spec, shape_range=built) if built else spec
