"""The ``torch_cuda_graphs`` runtime: capture once per signature, replay, clone outputs, fall back to eager.

On the CPU the graph machinery is a fake (:class:`FakeBackend`) with CUDA graphs' semantics: capture
leaves the static outputs undefined (NaN here) and a replay recomputes them from the static inputs,
overwriting the previous values in place. A ``gpu`` test runs the real ``torch.cuda`` backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from onnx_fixtures import LIMITS, compile_request, conv_component
from sd_fixtures import tiny_sd1
from torch import Tensor

import latentrt
from latentrt.core.protocols import CompileRequest
from latentrt.plugins.stable_diffusion.runtime_components import CompiledUNet
from latentrt.runtimes import cuda_graphs
from latentrt.runtimes.cuda_graphs import CudaGraphRuntime, GraphedModule
from latentrt.runtimes.memory_format import is_channels_last
from latentrt.runtimes.torch import TorchModule

Outputs = tuple[Tensor, ...]


class FakeGraph:
    """Replays by rerunning the captured function and copying into the static outputs, as CUDA graphs do."""

    def __init__(self, run: Callable[[], Outputs], outputs: Outputs, events: list[str]) -> None:
        self.run, self.outputs, self.events = run, outputs, events

    def replay(self) -> None:
        self.events.append("replay")
        for static, fresh in zip(self.outputs, self.run(), strict=True):
            static.copy_(fresh)


class FakeBackend:
    """Records warm-ups, captures and replays; ``fail`` makes capture raise like an uncapturable op."""

    def __init__(self, fail: str | None = None) -> None:
        self.events: list[str] = []
        self.fail = fail

    def warm_up(self, run: Callable[[], Outputs], runs: int) -> None:
        self.events.append(f"warm_up x{runs}")
        for _ in range(runs):
            run()

    def capture(self, run: Callable[[], Outputs]) -> tuple[FakeGraph, Outputs]:
        if self.fail:
            raise RuntimeError(self.fail)
        self.events.append("capture")
        outputs = tuple(out.fill_(float("nan")) for out in run())  # undefined until the first replay
        return FakeGraph(run, outputs, self.events), outputs


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"tiny conv weights")
    return path


def graphed(
    backend: FakeBackend, weights: Path, tmp_path: Path, max_graphs: int = 4
) -> tuple[GraphedModule, Callable[[Tensor], Tensor]]:
    """The tiny conv component on the graphs runtime with ``backend``, and its eager reference."""
    component = conv_component()
    runtime = CudaGraphRuntime(max_graphs=max_graphs, backend=lambda device: backend)
    compiled = runtime.compile(compile_request(component, weights, tmp_path))
    assert isinstance(compiled, GraphedModule)

    def eager(latent: Tensor) -> Tensor:
        with torch.no_grad():
            out: Tensor = component.module(latent)
        return out

    return compiled, eager


def test_one_capture_per_shape_then_replays(weights: Path, tmp_path: Path) -> None:
    backend = FakeBackend()
    compiled, eager = graphed(backend, weights, tmp_path)
    for _ in range(3):
        latent = torch.randn(2, 4, 8, 12)
        assert torch.equal(compiled({"latent": latent})["images"], eager(latent))
    assert backend.events == ["warm_up x3", "capture", "replay", "replay", "replay"]
    assert compiled.captures == 1 and compiled.fallback_reason is None


def test_a_new_shape_or_dtype_is_a_new_capture_and_old_ones_are_kept(weights: Path, tmp_path: Path) -> None:
    backend = FakeBackend()
    compiled, eager = graphed(backend, weights, tmp_path)
    shapes = [(1, 4, 8, 8), (2, 4, 16, 8), (1, 4, 8, 8), (2, 4, 16, 8)]
    for shape in shapes:
        latent = torch.randn(shape)
        assert torch.equal(compiled({"latent": latent})["images"], eager(latent))
    assert compiled.captures == 2 and backend.events.count("replay") == 4
    compiled({"latent": torch.randn(1, 4, 8, 8, dtype=torch.float64).float()})  # same signature: replay
    assert compiled.captures == 2
    compiled.module.double()
    compiled({"latent": torch.randn(1, 4, 8, 8, dtype=torch.float64)})
    assert compiled.captures == 3  # the dtype is part of the signature


def test_outputs_are_clones_that_the_next_replay_does_not_overwrite(weights: Path, tmp_path: Path) -> None:
    compiled, eager = graphed(FakeBackend(), weights, tmp_path)
    first, second = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out_first = compiled({"latent": first})["images"]
    out_second = compiled({"latent": second})["images"]
    assert torch.equal(out_first, eager(first)) and torch.equal(out_second, eager(second))
    static = next(iter(compiled.graphs.values())).outputs[0]
    assert out_second.data_ptr() != static.data_ptr()


def test_feeds_are_copied_so_the_caller_may_reuse_its_tensors(weights: Path, tmp_path: Path) -> None:
    compiled, eager = graphed(FakeBackend(), weights, tmp_path)
    latent = torch.randn(1, 4, 8, 8)
    expected = eager(latent.clone())
    out = compiled({"latent": latent})["images"]
    latent.zero_()  # the graph read its own static copy
    assert torch.equal(out, expected)
    assert torch.equal(compiled({"latent": latent})["images"], eager(latent))


def test_least_recently_used_graphs_are_dropped_past_max_graphs(weights: Path, tmp_path: Path) -> None:
    compiled, _ = graphed(FakeBackend(), weights, tmp_path, max_graphs=2)
    for side in (8, 12, 8, 16):  # 12 is least recently used when 16 arrives
        compiled({"latent": torch.randn(1, 4, side, side)})
    assert [signature[0][1][-1] for signature in compiled.graphs] == [8, 16]


def test_a_failed_capture_falls_back_to_eager_and_says_why_once(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend(fail="operation not permitted when stream is capturing")
    compiled, eager = graphed(backend, weights, tmp_path)
    with caplog.at_level(logging.WARNING, logger=cuda_graphs.__name__):
        for shape in [(1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 8, 16)]:
            latent = torch.randn(shape)
            assert torch.equal(compiled({"latent": latent})["images"], eager(latent))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not permitted when stream is capturing" in warnings[0]
    assert "running it eagerly" in warnings[0] and "latent [1, 4, 8, 8] float32" in warnings[0]
    assert backend.events == ["warm_up x3"]  # no second attempt
    assert compiled.captures == 0 and compiled.fallback_reason is not None


def test_off_cuda_the_runtime_is_eager_and_says_why(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    component = conv_component()
    with caplog.at_level(logging.WARNING, logger=cuda_graphs.__name__):
        compiled = CudaGraphRuntime().compile(compile_request(component, weights, tmp_path))
    assert isinstance(compiled, TorchModule)
    assert "CUDA graphs need a CUDA device, cpu is not one" in caplog.text
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(compiled({"latent": latent})["images"], component.module(latent))


def test_out_of_range_feeds_are_refused_before_any_capture(weights: Path, tmp_path: Path) -> None:
    backend = FakeBackend()
    compiled, _ = graphed(backend, weights, tmp_path)
    with pytest.raises(latentrt.InvalidRequest, match="height 80 is outside"):
        compiled({"latent": torch.zeros(1, 4, 40, 8)})
    assert backend.events == []


def test_channels_last_option_converts_the_weights(weights: Path, tmp_path: Path) -> None:
    component = conv_component()
    runtime = CudaGraphRuntime(channels_last=True, backend=lambda device: FakeBackend())
    runtime.compile(compile_request(component, weights, tmp_path))
    assert is_channels_last(component.module)


def test_runtimes_are_registered(registry: latentrt.Registry) -> None:
    names = {"torch_cuda_graphs", "torch_cuda_graphs_channels_last", "torch_channels_last"}
    assert names <= set(registry.runtimes)
    made = registry.runtime("torch_cuda_graphs_channels_last").factory()
    assert isinstance(made, CudaGraphRuntime) and made.channels_last and made.available()


@pytest.mark.usefixtures("one_thread")
def test_pipeline_unet_on_graphs_matches_eager(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load(path, runtime={"unet": "torch_cuda_graphs"})``: one capture for a whole generation (CFG batch
    at one size), every step a replay, the same latents as the native pipeline."""
    backend = FakeBackend()
    monkeypatch.setattr(CudaGraphRuntime, "_backend_for", lambda self, device: backend)
    tiny = tiny_sd1(tmp_path_factory)
    native = latentrt.load(tiny.single_file, progress=False)
    graphs = latentrt.load(tiny.single_file, progress=False, runtime={"unet": "torch_cuda_graphs"}, limits=LIMITS)
    unet = graphs.model.denoiser.backbone  # type: ignore[attr-defined]
    assert isinstance(unet, CompiledUNet) and isinstance(unet.compiled, GraphedModule)
    request: dict[str, Any] = {"prompt": "a red cube", "steps": 4, "seed": 5, "width": 64, "height": 64}
    for sampler in ("euler", "dpmpp_2m"):
        expected, got = native(**request, sampler=sampler), graphs(**request, sampler=sampler)
        assert float((expected.latents - got.latents).abs().max()) <= 1e-6
    assert unet.compiled.captures == 1 and backend.events.count("replay") == 8


@pytest.mark.gpu
def test_real_cuda_graphs_replay_the_module(weights: Path, tmp_path: Path) -> None:
    """On a GPU: the torch.cuda backend captures once and replays to the eager result."""
    component = conv_component()
    request = compile_request(component, weights, tmp_path)
    request = CompileRequest(request.component, weights, "fp32", torch.device("cuda"), tmp_path, progress=False)
    compiled = CudaGraphRuntime().compile(request)
    assert isinstance(compiled, GraphedModule)
    outs, latents = [], [torch.randn(2, 4, 8, 12, device="cuda") for _ in range(3)]
    for latent in latents:
        outs.append(compiled({"latent": latent})["images"])
    with torch.no_grad():
        for latent, out in zip(latents, outs, strict=True):
            torch.testing.assert_close(out, component.module(latent), rtol=0, atol=1e-5)
    assert compiled.captures == 1 and compiled.fallback_reason is None


def test_concurrent_calls_take_turns_on_the_static_buffers(weights: Path, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    compiled, eager = graphed(FakeBackend(), weights, tmp_path)
    latents = [torch.randn(1, 4, 8, 8) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda latent: compiled({"latent": latent})["images"], latents))
    assert all(torch.equal(out, eager(latent)) for latent, out in zip(latents, outs, strict=True))
    assert compiled.captures == 1
