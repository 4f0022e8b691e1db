"""Peak memory and work of one SD 1.x / 2.x / XL (or demo) generation, predicted before loading it.

The architecture comes from a single file's header (names, shapes and dtypes; no weight is
read) or from a family name (``sd1``, ``sd2``, ``sdxl``: the reference shapes). A generation
runs in stages, and the process peaks in one of them:

* ``load``: the weights in the compute dtype, or the storage dtype with ``storage`` (a conversion
  drops each source tensor's file pages once converted, ``latentrt.core.memory.release_file_pages``;
  unconverted weights stay mapped); offloading, the largest network only;
* ``text``: every resident weight plus the text encoder's activations;
* ``unet``: every resident weight plus one UNet call (batch doubled by CFG), traced;
* ``decode``: every resident weight plus the VAE decoder's activations (per tile when tiled), traced.
  The UNet's freed tensors under 32 MiB, which glibc's allocator would keep in its heap into the
  decode, are handed back before it (``Pipeline.generate`` calls ``malloc_trim``), so they no longer
  count; without that, they made the decode peak vary by up to 20% from run to run.

Activations are traced on the meta device (:func:`latentrt.core.memory.trace`), so they follow
our networks' real code. On top, each stage adds what kernels allocate out of sight of the
trace (``KERNEL_WORKSPACE``) and the peak adds the interpreter's own baseline (torch, latentrt,
the tokenizer), which the caller measures or passes. With ``offload``, a stage holds its own
network's weights only (the others are parked, :mod:`latentrt.core.offload`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from latentrt.core.checkpoint import Checkpoint, open_checkpoint
from latentrt.core.errors import CheckpointError, InvalidRequest
from latentrt.core.layerwise import stored_parameter_names
from latentrt.core.loader import builtin_checkpoint
from latentrt.core.memory import rss_bytes, trace
from latentrt.core.registry import registry
from latentrt.plugins.stable_diffusion.clip import CLIP_VIT_L, OPENCLIP_VIT_BIGG, SD2_TEXT, CLIPTextTransformer
from latentrt.plugins.stable_diffusion.families import UNET_PREFIX, VAE_PREFIX, detect_family
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer
from latentrt.plugins.stable_diffusion.unet import SD1_UNET, SD2_UNET, SDXL_UNET, HeadConvention, UNet, UNetConfig
from latentrt.plugins.stable_diffusion.vae import AutoencoderKL, Tiling, VAEConfig, _fits, _tiled

__all__ = [
    "KERNEL_WORKSPACE",
    "REFERENCE_FLOPS",
    "RUNTIME_OVERHEAD",
    "Architecture",
    "Estimate",
    "Settings",
    "architecture",
    "estimate",
    "interpreter_baseline",
]

TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")
CONTEXT_TOKENS = 77
KERNEL_WORKSPACE = 2.0
"""Bytes kernels allocate outside the trace, in multiples of the widest full-resolution activation:
oneDNN runs a convolution in its blocked layout, converting the NCHW input into a copy and writing
the output into a buffer of its own before converting back."""
REFERENCE_FLOPS = 34_645_000_000_000
"""Work of SD 1.5 at 512x512, batch 1, CFG, 20 steps (20 UNet calls of 1606.5 GFLOP on batch 2,
one VAE decode of 2514.5 GFLOP, as ``torch.utils.flop_counter.FlopCounterMode`` counts them): the
unit of relative time."""
RUNTIME_OVERHEAD = 40 * 2**20
"""Bytes a first generation keeps beyond its tensors (oneDNN kernels, allocator caches, lazily
imported modules): measured as the whole gap between estimate and peak RSS on the demo model at
64x64, where activations are negligible (``tools/measure_peak.py``)."""
_HEADS: dict[str, HeadConvention] = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sdxl_refiner": "sdxl", "demo": "sd2"}
_DEMO_TOKEN_IDS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.token_ids"


@dataclass(frozen=True)
class _Shape:
    """A stand-in for a tensor where only ``.shape`` is read (config inference from a header)."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs to know of a model: its networks' shapes and weight sizes."""

    family: str
    unet: UNetConfig
    vae: VAEConfig
    parameters: Mapping[str, int]
    """Floating-point elements per component: ``text``, ``unet``, ``vae``."""
    text_width: int
    """The widest text encoder's hidden size (its activations are ``tokens x width`` wide)."""
    token_tables: Mapping[torch.dtype, int] = field(default_factory=dict)
    """Elements of the CLIP token tables by stored dtype. Loaded without conversion they stay
    memory-mapped, and only the rows of the prompts' tokens are ever read into memory."""


@dataclass(frozen=True)
class Settings:
    """One generation to estimate: image size, batch, guidance, precision and VAE tiling."""

    width: int = 512
    height: int = 512
    batch: int = 1
    cfg: bool = True
    dtype: torch.dtype = torch.float32
    vae_tiling: bool = False
    steps: int = 20
    storage: torch.dtype | None = None
    """Layer weights kept in this dtype and upcast one layer at a time (``load(storage_dtype=)``)."""
    offload: bool = False
    """One network resident at a time (``load(offload="sequential")``)."""

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weights are held in."""
        return self.storage or self.dtype


@dataclass(frozen=True)
class Estimate:
    """Predicted peak memory (bytes over the interpreter's baseline, per stage) and work."""

    stages: Mapping[str, int]
    weights: Mapping[str, int]
    flops: Mapping[str, int]
    baseline: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def peak_stage(self) -> str:
        """The stage where memory peaks."""
        return max(self.stages, key=lambda name: self.stages[name])

    @property
    def peak(self) -> int:
        """Predicted peak resident set of the whole process: baseline plus the largest stage."""
        return self.baseline + self.stages[self.peak_stage]

    @property
    def total_flops(self) -> int:
        """Floating-point operations of the whole generation."""
        return sum(self.flops.values())


def architecture(model: str | Path) -> Architecture:
    """The architecture of a single file, the built-in ``demo``, or a family name (``sd1``/``sd2``/``sdxl``)."""
    if isinstance(model, str) and model in _REFERENCE and not Path(model).exists():
        return _REFERENCE[model]()
    checkpoint = open_checkpoint(builtin_checkpoint(model, registry()))
    if checkpoint.tensors is None:
        raise CheckpointError(
            f"{checkpoint.path}: estimate reads single-file checkpoints; for a diffusers folder pass its family "
            f"instead ({', '.join(_REFERENCE)})"
        )
    return _from_header(checkpoint)


def _from_header(checkpoint: Checkpoint) -> Architecture:
    """Shapes, dtypes and sizes from the safetensors header, without reading a weight."""
    tensors = checkpoint.tensors
    assert tensors is not None
    family = "demo" if _DEMO_TOKEN_IDS in tensors else detect_family(checkpoint)
    if family is None:
        raise CheckpointError(
            f"{checkpoint.path}: not an SD 1.x / 2.x / XL single file (no UNet cross-attention key found)"
        )
    groups = {"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX,), "text": TEXT_PREFIXES}
    parameters = dict.fromkeys(groups, 0)
    widths = [0]
    tables: dict[torch.dtype, int] = {}
    for name in tensors:
        dtype = tensors.dtype(name)
        component = next((c for c, prefixes in groups.items() if name.startswith(prefixes)), None)
        if component is None or not dtype.is_floating_point:
            continue
        shape = tensors.shape(name)
        numel = _numel(shape)
        parameters[component] += numel
        if name.endswith("token_embedding.weight"):
            widths.append(shape[-1])
            tables[dtype] = tables.get(dtype, 0) + numel
    unet_shapes = {k[len(UNET_PREFIX) :]: _Shape(tensors.shape(k)) for k in tensors if k.startswith(UNET_PREFIX)}
    vae_shapes = {k[len(VAE_PREFIX) :]: _Shape(tensors.shape(k)) for k in tensors if k.startswith(VAE_PREFIX)}
    unet = UNetConfig.from_state_dict(unet_shapes, heads=_HEADS[family])
    vae = VAEConfig.from_state_dict(vae_shapes)  # type: ignore[arg-type]  # reads .shape only
    return Architecture(family, unet, vae, parameters, max(widths), tables)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _reference(family: str, unet: UNetConfig, texts: tuple[CLIPTextTransformer, ...]) -> Architecture:
    """A family's reference architecture, its parameter counts from our networks on the meta device."""
    with torch.device("meta"):
        counts = {
            "unet": _parameters(UNet(unet)),
            "vae": _parameters(AutoencoderKL(VAEConfig())),
            "text": sum(_parameters(t) for t in texts),
        }
    width = max(t.config.hidden_size for t in texts)
    return Architecture(family, unet, VAEConfig(), counts, width)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.is_floating_point())


def _texts(*configs: object) -> Callable[[], tuple[CLIPTextTransformer, ...]]:
    def build() -> tuple[CLIPTextTransformer, ...]:
        with torch.device("meta"):
            return tuple(CLIPTextTransformer(c) for c in configs)  # type: ignore[arg-type]

    return build


_REFERENCE: dict[str, Callable[[], Architecture]] = {
    "sd1": functools.cache(lambda: _reference("sd1", SD1_UNET, _texts(CLIP_VIT_L)())),
    "sd2": functools.cache(lambda: _reference("sd2", SD2_UNET, _texts(SD2_TEXT)())),
    "sdxl": functools.cache(lambda: _reference("sdxl", SDXL_UNET, _texts(CLIP_VIT_L, OPENCLIP_VIT_BIGG)())),
}


def estimate(arch: Architecture, settings: Settings, *, baseline: int = 0) -> Estimate:
    """Predicted per-stage memory over ``baseline`` (the interpreter's own RSS) and FLOPs of one generation."""
    _check(arch, settings)
    compute, held = settings.dtype.itemsize, settings.weight_dtype.itemsize
    weights = {name: n * held for name, n in arch.parameters.items()}
    weights["text"] -= arch.token_tables.get(settings.weight_dtype, 0) * held  # mapped, read row by row
    unet, unet_flops = _unet_activations(arch, settings)
    decode, vae_flops = _decode_activations(arch, settings)
    rows = 2 * settings.batch if settings.cfg else settings.batch
    text = rows * CONTEXT_TOKENS * arch.text_width * 8 * compute  # hidden, q/k/v, 4x-wide MLP
    activations = {"text": text, "unet": unet, "decode": decode}
    owners = {"text": "text", "unet": "unet", "decode": "vae"}
    resident = {stage: weights[owners[stage]] if settings.offload else sum(weights.values()) for stage in owners}
    # offloading loads one network at a time; otherwise a conversion drops each tensor's file pages once read
    stages = {"load": max(weights.values()) if settings.offload else sum(weights.values())}
    for stage, act in activations.items():
        stages[stage] = resident[stage] + act
    flops = {"unet": unet_flops * settings.steps, "decode": vae_flops}
    return Estimate(stages, weights, flops, baseline, _notes(arch, settings))


def _check(arch: Architecture, settings: Settings) -> None:
    multiple = arch.vae.downscale * 2 ** (len(arch.unet.channel_mult) - 1)
    if settings.width % multiple or settings.height % multiple:
        raise InvalidRequest(
            f"{settings.width}x{settings.height} is not a multiple of {multiple} pixels, which this {arch.family} "
            f"model needs; round the size to a multiple of {multiple}"
        )
    if settings.batch < 1 or settings.steps < 1:
        raise InvalidRequest(f"batch and steps must be >= 1, got batch {settings.batch}, steps {settings.steps}")


def _unet_activations(arch: Architecture, settings: Settings) -> tuple[int, int]:
    """Peak activation bytes and FLOPs of one UNet call on the CFG-doubled batch."""
    rows = 2 * settings.batch if settings.cfg else settings.batch
    h, w = settings.height // arch.vae.downscale, settings.width // arch.vae.downscale
    cfg = arch.unet
    with torch.device("meta"):
        unet = UNet(cfg).to(settings.dtype)
        sample = torch.empty(rows, cfg.in_channels, h, w, dtype=settings.dtype)
        timestep = torch.empty(rows)
        context = torch.empty(rows, CONTEXT_TOKENS, cfg.context_dim, dtype=settings.dtype)
        y = None if cfg.adm_in_channels is None else torch.empty(rows, cfg.adm_in_channels, dtype=settings.dtype)
    probe = trace(lambda: unet(sample, timestep, context, y))
    peak = _with_workspace(probe.peak_bytes, rows * 2 * arch.unet.model_channels * h * w, settings)
    if settings.storage is not None:  # one layer's weight upcast at a time
        peak += max(unet.get_parameter(name).numel() for name in stored_parameter_names(unet)) * settings.dtype.itemsize
    return peak, probe.flops


def _decode_activations(arch: Architecture, settings: Settings) -> tuple[int, int]:
    """Peak activation bytes and FLOPs of the VAE decode (tiled: one tile at a time plus the output)."""
    h, w = settings.height // arch.vae.downscale, settings.width // arch.vae.downscale
    with torch.device("meta"):
        vae = AutoencoderKL(arch.vae).to(settings.dtype)
        latents = torch.empty(settings.batch, arch.vae.latent_channels, h, w, dtype=settings.dtype)
    tiling = Tiling() if settings.vae_tiling else None
    tile = h if tiling is None or _fits(latents, tiling, 1) else tiling.tile_size
    if tiling is None or tile == h:
        probe = trace(lambda: vae._decode_unscaled(latents))
    else:
        probe = trace(lambda: _tiled(vae._decode_unscaled, latents, tiling, 1, vae.downscale))
    widest = max(arch.vae.ch_mult[:2]) * arch.vae.ch * settings.batch * (tile * arch.vae.downscale) ** 2
    images = 3 * settings.batch * settings.height * settings.width * 4 * 2  # float32 copy and its clamp
    return _with_workspace(probe.peak_bytes, widest, settings) + images, probe.flops


def _with_workspace(traced: int, widest_elements: int, settings: Settings) -> int:
    """Traced bytes plus the kernels' unseen copy of their widest input."""
    return traced + int(KERNEL_WORKSPACE * widest_elements * settings.dtype.itemsize)


def _notes(arch: Architecture, settings: Settings) -> tuple[str, ...]:
    notes = []
    if not settings.vae_tiling and settings.width * settings.height > 1024 * 1024:
        notes.append("large image: --vae-tiling decodes it in 512-pixel tiles and lowers the decode stage")
    if settings.dtype == torch.float32 and settings.storage is None:
        notes.append("--storage-dtype fp16 halves the weights at fp32 arithmetic; --dtype bf16 halves them too")
    if not settings.offload:
        notes.append("--offload sequential keeps one network in memory at a time")
    return tuple(notes)


def interpreter_baseline() -> int:
    """The resident set a generating process has before its first weight: this interpreter's RSS once
    it has imported what a generation imports (torch, latentrt and its plugins, the CLIP tokenizer
    tables, the modules torch loads lazily on first use), plus ``RUNTIME_OVERHEAD``."""
    registry()
    CLIPTokenizer.from_package()
    with torch.device("meta"):
        unet = UNet(replace(SD1_UNET, model_channels=32, context_dim=32, num_heads=1))
        sample, context = torch.empty(1, 4, 8, 8), torch.empty(1, 1, 32)
    trace(lambda: unet(sample, torch.empty(1), context))
    return rss_bytes() + RUNTIME_OVERHEAD
