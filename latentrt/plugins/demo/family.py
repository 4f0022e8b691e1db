"""The demo model family: detection of the demo checkpoint layout and loading it into a ``Model``.

The demo checkpoint is an SD 1.x single file in every respect but three, which is how it
is recognised and what this family reads differently (see :mod:`.model`):

* its CLIP token table is pruned, so it carries
  ``cond_stage_model.transformer.text_model.embeddings.token_embedding.token_ids``;
* its UNet uses 64-feature attention heads (the SD2 convention) and a 128-wide context;
* its latent scale is the top-level ``scale_factor`` tensor (LDM ``scale_by_std``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from latentrt.core.checkpoint import Checkpoint, load_module, shape_of
from latentrt.core.denoiser import Prediction
from latentrt.core.errors import CheckpointError
from latentrt.core.pipeline import Model
from latentrt.core.protocols import Conditioning
from latentrt.plugins.demo.model import TOKEN_IDS_KEY, PrunedTokenEmbedding, demo_text_model
from latentrt.plugins.stable_diffusion.clip import CLIPTextTransformer
from latentrt.plugins.stable_diffusion.families import UNET_PREFIX, UNetBackbone, assemble_model, load_unet, load_vae
from latentrt.plugins.stable_diffusion.keys.clip import SD1_CLIP_PREFIX, sd1_text_weights
from latentrt.plugins.stable_diffusion.text import SDTextEncoder
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer

__all__ = ["DEMO", "DEMO_CHECKPOINT", "DEMO_MODEL_NAME", "DemoFamily", "DemoTextEncoder"]

logger = logging.getLogger(__name__)

#: The trained demo weights shipped inside the package (``tools/train_demo.py`` writes them).
DEMO_CHECKPOINT = Path(__file__).with_name("latentrt-demo.safetensors")
DEMO_MODEL_NAME = DEMO_CHECKPOINT.stem
"""The demo model's name in parameters text and PNG metadata ("Model: latentrt-demo")."""
SCALE_KEY = "scale_factor"
DEMO_SIZES = (16, 64, 128)
"""Image sides (pixels: min, optimum, max) the demo model's exports cover by default."""
_TOKEN_IDS = SD1_CLIP_PREFIX + TOKEN_IDS_KEY
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters: prompt words without weights, brackets or commas


@dataclass
class DemoTextEncoder(SDTextEncoder):
    """:class:`SDTextEncoder` that says once which words the pruned token table does not know."""

    warned: set[str] = field(default_factory=set)
    known_ids: frozenset[int] | None = field(init=False, default=None)
    """The CLIP ids the pruned token table has rows for (None: a full table, every word is known);
    read once here, as a runtime may later replace ``model`` with a compiled one."""

    def __post_init__(self) -> None:
        table = self.model.embeddings.token_embedding
        if isinstance(table, PrunedTokenEmbedding):
            self.known_ids = frozenset(table.token_ids.tolist())

    def encode(
        self, prompts: Sequence[str], *, clip_skip: int = 1, secondary: Sequence[str] | None = None
    ) -> Conditioning:
        """As :meth:`SDTextEncoder.encode`; words outside the demo vocabulary read as "unknown"."""
        self._warn_unknown(prompts)
        return super().encode(prompts, clip_skip=clip_skip, secondary=secondary)

    def _warn_unknown(self, prompts: Sequence[str]) -> None:
        known = self.known_ids
        if known is None or isinstance(prompts, str):
            return
        words = {w for prompt in prompts for w in _WORD.findall(prompt) if w != "BREAK"}  # A1111 syntax aside
        unknown = {w for w in words if not set(self.tokenizer.encode(w)) <= known} - self.warned
        if unknown:
            self.warned |= unknown
            logger.warning("the demo model does not know %s; it knows shapes, colours, sizes and places",
                           ", ".join(sorted(unknown)))  # fmt: skip


@dataclass(frozen=True)
class DemoFamily:
    """Loads the built-in demo checkpoint (or any checkpoint in its layout)."""

    name: str = "demo"
    label: str = "latentrt demo (64x64 shapes)"
    default_size: int = 64
    builtin: Path = DEMO_CHECKPOINT

    def detect(self, checkpoint: Checkpoint) -> bool:
        """Whether ``checkpoint`` is a single file with a pruned CLIP token table."""
        return checkpoint.tensors is not None and _TOKEN_IDS in checkpoint.tensors

    def __call__(
        self,
        checkpoint: Checkpoint,
        *,
        vae: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prediction: Prediction | None = None,
        vae_tiling: bool = False,
    ) -> Model:
        """The demo text encoder, UNet and VAE (or a separate VAE file) as a ``Model``."""
        device = torch.device(device)
        tensors = checkpoint.tensors
        assert tensors is not None
        text_model = load_demo_text(sd1_text_weights(tensors), device, dtype)
        unet = load_unet(tensors.with_prefix(UNET_PREFIX), "sd2", self.label, device, dtype)
        scale = read_scale(tensors)
        autoencoder, vae_name, vae_hash = load_vae(vae, tensors, scale, device, dtype, vae_tiling)
        # runtimes take over the same components as SD 1.x's, by default over the demo's own
        # sizes (16..128 px, best at 64; at 8x8 its GroupNorms see one value per group)
        text_encoder = DemoTextEncoder(text_model, CLIPTokenizer.from_package(), device)
        return assemble_model(self.name, checkpoint, text_encoder, UNetBackbone(unet), prediction or "eps",
                              (autoencoder, vae_name, vae_hash), default_size=self.default_size, device=device,
                              dtype=dtype, sizes=DEMO_SIZES)  # fmt: skip


def load_demo_text(weights: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype) -> CLIPTextTransformer:
    """The demo CLIP text transformer with its pruned token table (transformers names)."""
    rows = shape_of(weights, TOKEN_IDS_KEY.removeprefix("text_model."))[0]
    model = load_module(
        lambda: demo_text_model(torch.empty(rows, dtype=torch.int64)), weights, "demo text encoder", device=device,
        dtype=dtype,
    )  # fmt: skip
    assert isinstance(model, CLIPTextTransformer)
    return model


def read_scale(tensors: Mapping[str, Tensor]) -> float:
    """The latent scale stored as LDM's top-level ``scale_factor``."""
    if SCALE_KEY not in tensors:
        raise CheckpointError(f"demo checkpoint lacks '{SCALE_KEY}' (the latent scale); retrain or re-export it")
    scale = float(tensors[SCALE_KEY].float().item())
    if not scale > 0:
        raise CheckpointError(f"demo checkpoint has scale_factor {scale}; it must be positive")
    return scale


DEMO = DemoFamily()
