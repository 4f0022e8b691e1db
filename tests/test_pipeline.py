"""The family-agnostic pipeline on small stand-in components (parity with diffusers lives in test_sd_pipeline)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import torch
from PIL import Image
from torch import Tensor

from latentrt.core.denoiser import DiscreteDenoiser
from latentrt.core.errors import InvalidRequest
from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.parameters import parse_parameters
from latentrt.core.pipeline import GenerationCancelled, Model, Pipeline
from latentrt.core.protocols import Conditioning, StepInfo


class FakeTextEncoder:
    """Context = the prompt's length and first character code, repeated; records batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def encode(self, prompts: Sequence[str], *, clip_skip: int = 1) -> Conditioning:
        self.batches.append(len(prompts))
        rows = [[len(p) / 10.0, (ord(p[0]) if p else 0) / 100.0, float(clip_skip)] for p in prompts]
        return Conditioning(torch.tensor(rows).view(len(prompts), 1, 3).expand(-1, 77, -1).contiguous())


class FakeVAE:
    """8x average pooling to 4 channels and nearest upsampling back; posterior std 0.1."""

    scaling_factor, shift_factor, latent_channels, downscale = 0.5, 0.0, 4, 8

    def encode(self, images: Tensor, generator: Sequence[torch.Generator] | None = None) -> Tensor:
        mean = torch.nn.functional.avg_pool2d(images, 8)
        mean = torch.cat([mean, mean.mean(1, keepdim=True)], dim=1)
        if generator is not None:
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generator])
            mean = mean + 0.1 * eps
        return mean * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        return torch.nn.functional.interpolate(latents[:, :3] / self.scaling_factor, scale_factor=8).tanh()


def backbone(sample: Tensor, timestep: Tensor, context: Tensor, c_concat: Tensor | None = None) -> Tensor:
    """A smooth stand-in for a UNet: eps depends on the input, the timestep and the context."""
    bias = context[:, 0, :1].view(-1, 1, 1, 1) - context[:, 0, 1:2].view(-1, 1, 1, 1)
    return 0.3 * sample + 0.05 * torch.sin(timestep.view(-1, 1, 1, 1) / 100) + bias


def make_pipeline() -> tuple[Pipeline, FakeTextEncoder]:
    encoder = FakeTextEncoder()
    model = Model(
        family="fake",
        text_encoder=encoder,
        denoiser=DiscreteDenoiser(backbone, sd_model_sampling()),
        vae=FakeVAE(),
        name="fake-model",
        default_size=32,
        model_hash=lambda: "0123456789",
    )
    return Pipeline(model, progress=False), encoder


def test_txt2img_batch_images_equal_single_runs() -> None:
    pipe, _ = make_pipeline()
    batch = pipe("a cat", seed=10, batch_size=3, steps=6, sampler="euler_ancestral")
    assert batch.seeds == [10, 11, 12]
    single = pipe("a cat", seed=11, steps=6, sampler="euler_ancestral")
    torch.testing.assert_close(batch.latents[1:2], single.latents, rtol=0, atol=1e-6)
    assert batch.images[1].tobytes() == single.images[0].tobytes()
    assert batch.images[0].size == (32, 32)


def test_same_seed_same_image_and_prompt_changes_it() -> None:
    pipe, _ = make_pipeline()
    a, b = pipe("a cat", seed=3, steps=5), pipe("a cat", seed=3, steps=5)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, pipe("a dog!", seed=3, steps=5).latents)


def test_cfg_runs_prompts_and_negatives_in_one_encode_and_skips_at_scale_one() -> None:
    pipe, encoder = make_pipeline()
    pipe("a cat", negative_prompt="blurry", seed=1, steps=3, batch_size=2)
    pipe("a cat", seed=1, steps=3, cfg_scale=1.0)
    assert encoder.batches == [4, 1]


def test_parameters_text_per_image() -> None:
    pipe, _ = make_pipeline()
    result = pipe(["a cat", "a dog"], negative_prompt="blurry", seed=7, steps=4, batch_size=2, sampler="DPM++ 2M",
                  scheduler="karras", cfg_scale=5.5, clip_skip=2)  # fmt: skip
    second = parse_parameters(result.parameters[1])
    assert second.prompt == "a dog"
    assert second.negative_prompt == "blurry"
    assert second.settings["Seed"] == "8"
    assert second.settings["Sampler"] == "DPM++ 2M"
    assert second.settings["Schedule type"] == "Karras"
    assert second.settings["CFG scale"] == "5.5"
    assert second.settings["Size"] == "32x32"
    assert second.settings["Model hash"] == "0123456789"
    assert second.settings["Model"] == "fake-model"
    assert second.settings["Clip skip"] == "2"
    assert second.settings["Version"].startswith("latentrt ")


def test_callback_and_cancellation() -> None:
    pipe, _ = make_pipeline()
    seen: list[StepInfo] = []
    pipe.generate(pipe_request(steps=5), callback=seen.append)
    assert [s.i for s in seen] == [0, 1, 2, 3, 4]
    cancel = threading.Event()

    def stop_after_two(info: StepInfo) -> None:
        if info.i == 1:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        pipe.generate(pipe_request(steps=5), callback=stop_after_two, cancel=cancel)


def pipe_request(**options: object) -> object:
    from latentrt.core.request import GenerationRequest

    return GenerationRequest(prompt="a cat", seed=1, **options)  # type: ignore[arg-type]


def _image(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (32, 32), color)


def test_img2img_runs_strength_times_steps() -> None:
    pipe, _ = make_pipeline()
    seen: list[StepInfo] = []
    pipe.generate(pipe_request(steps=10, init_image=_image((200, 30, 30)), strength=0.6), callback=seen.append)
    assert len(seen) == 6
    with pytest.raises(InvalidRequest, match="leaves no steps"):
        pipe.generate(pipe_request(steps=2, init_image=_image((0, 0, 0)), strength=0.3))


def test_inpainting_keeps_the_unmasked_latents() -> None:
    pipe, _ = make_pipeline()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    init = _image((10, 200, 10))
    result = pipe.generate(pipe_request(steps=6, init_image=init, mask=mask, strength=1.0, sampler="euler"))
    image_latents = FakeVAE().encode(
        torch.full((1, 3, 32, 32), 0.0) + torch.tensor([10, 200, 10]).view(1, 3, 1, 1) / 127.5 - 1,
        [torch.Generator().manual_seed(1)],
    )
    torch.testing.assert_close(result.latents[..., 2:], image_latents[..., 2:], rtol=0, atol=1e-5)
    assert not torch.allclose(result.latents[..., :2], image_latents[..., :2], atol=1e-3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 30}, "width must be a positive multiple of 8, got 30; try 24"),
        ({"steps": 0}, "steps must be an integer in 1..10000"),
        ({"cfg_scale": float("nan")}, "cfg_scale must be a number"),
        ({"mask": Image.new("L", (32, 32))}, "a mask needs an init image"),
        ({"batch_size": 2, "prompt": ["a", "b", "c"]}, "prompt has 3 entries for batch_size 2"),
        ({"seed": 2**40}, "seed must be -1"),
        ({"sampler": "eulr"}, "unknown sampler 'eulr'"),
        ({"init_image": Image.new("RGB", (32, 32)), "strength": 1.5}, "strength must be in 0.0..1.0"),
    ],
)
def test_bad_requests_are_refused_before_any_work(options: dict[str, object], message: str) -> None:
    pipe, encoder = make_pipeline()
    request = {"prompt": "a cat", "seed": 1, **options}
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        pipe(**request)  # type: ignore[arg-type]
    assert "LatentRTError" in [c.__name__ for c in type(info.value).__mro__]
    assert encoder.batches == []


def test_one_pipeline_serves_many_threads() -> None:
    """No per-request state: requests run concurrently from 4 threads equal the same requests run alone."""
    pipe, _ = make_pipeline()
    requests = [
        {"prompt": p, "seed": s, "steps": 6, "sampler": sampler}
        for p, s, sampler in [
            ("a cat", 1, "euler"),
            ("a dog!", 2, "dpmpp_2m_sde"),
            ("x", 3, "Euler a"),
            ("yy", 4, "heun"),
        ]
    ]
    alone = [pipe(**r).latents for r in requests]  # type: ignore[arg-type]
    results: dict[int, Tensor] = {}

    def run(k: int) -> None:
        for _ in range(3):
            results[k] = pipe(**requests[k]).latents  # type: ignore[arg-type]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, expected in enumerate(alone):
        assert torch.equal(results[k], expected)


def test_refiner_handoff_after_the_switch_fraction() -> None:
    """refiner_switch_at=0.6 of 5 steps: the base runs steps 0-2, the refiner steps 3-4 (A1111's rule)."""
    base, _ = make_pipeline()
    refiner, _ = make_pipeline()
    calls: list[str] = []

    def spy(name: str, inner: object) -> object:
        def backbone_spy(*args: Tensor, **kwargs: Tensor) -> Tensor:
            calls.append(name)
            return inner(*args, **kwargs)  # type: ignore[operator]

        return backbone_spy

    base.model.denoiser.backbone = spy("base", backbone)  # type: ignore[attr-defined]
    refiner.model.denoiser.backbone = spy("refiner", lambda *a, **k: 0.5 * backbone(*a, **k))  # type: ignore[attr-defined]
    refiner.model.family = "fake_refiner"
    pipe = Pipeline(base.model, progress=False, refiner=refiner.model)
    handed = pipe("a cat", seed=1, steps=5, refiner_switch_at=0.6)
    assert calls == ["base"] * 3 + ["refiner"] * 2
    assert not torch.equal(handed.latents, pipe("a cat", seed=1, steps=5).latents)
    with pytest.raises(InvalidRequest, match="needs a refiner"):
        base("a cat", seed=1, steps=5, refiner_switch_at=0.5)
    with pytest.raises(InvalidRequest, match="is a fake model, not a refiner for the fake model"):
        Pipeline(base.model, refiner=base.model)
