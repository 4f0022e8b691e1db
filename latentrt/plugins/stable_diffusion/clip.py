"""CLIP text transformer (Radford et al. 2021): the text encoder of SD1 (OpenAI CLIP ViT-L/14),
SD2 (OpenCLIP ViT-H/14) and SDXL (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14).

Parameter names are transformers' ``CLIPTextModel`` ones (``embeddings.token_embedding``,
``encoder.layers.N.self_attn.q_proj``, ``final_layer_norm``, optional ``text_projection``):
SD1 single files store exactly these under ``cond_stage_model.transformer.text_model.``.
OpenCLIP layouts are renamed to them in :mod:`.keys.clip`.

The network: token + learned position embeddings, then pre-norm transformer layers
``x = x + attn(ln1(x)); x = x + mlp(ln2(x))`` with causal self-attention, then a final
layer norm. The pooled output is the final-normed state at the end-of-text token, which is
the highest token id in each sequence (CLIP's ``text.argmax(dim=-1)``), optionally
projected by ``text_projection`` (SDXL's ``text_embeds``).

What the weights do not say (REFERENCE.md, "Checkpoint layouts"): heads of 64 features,
quick_gelu for OpenAI CLIP-L and exact gelu for OpenCLIP, layer-norm eps 1e-5.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from latentrt.core.checkpoint import describe, load_module, shape_of
from latentrt.core.errors import CheckpointError, InvalidRequest

__all__ = [
    "CLIP_VIT_L",
    "HEAD_DIM",
    "OPENCLIP_VIT_BIGG",
    "OPENCLIP_VIT_H",
    "SD2_TEXT",
    "Activation",
    "CLIPTextConfig",
    "CLIPTextOutput",
    "CLIPTextTransformer",
    "load_clip_text",
]

Activation = Literal["quick_gelu", "gelu"]

#: Features per attention head in every CLIP text encoder (CLIP-L 12 heads, ViT-H 16, bigG 20).
HEAD_DIM = 64

_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text transformer; the defaults are OpenAI CLIP ViT-L/14 (SD1)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % HEAD_DIM:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of the head size {HEAD_DIM}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")

    @property
    def num_heads(self) -> int:
        """Attention heads: CLIP text encoders use heads of 64 features."""
        return self.hidden_size // HEAD_DIM

    @classmethod
    def from_state_dict(
        cls, weights: Mapping[str, Tensor], activation: Activation, what: str = "CLIP text encoder"
    ) -> CLIPTextConfig:
        """The config of ``weights`` (transformers names), read from shapes and layer indices.

        ``activation`` cannot be read from weights: pass the family's convention,
        ``"quick_gelu"`` for OpenAI CLIP-L and ``"gelu"`` for OpenCLIP ViT-H / bigG.
        """
        required = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight")
        missing = [k for k in (*required, "encoder.layers.0.mlp.fc1.weight") if k not in weights]
        if missing:
            raise CheckpointError(f"{describe(weights)}: not a valid {what}: missing {', '.join(missing)}")
        vocab_size, hidden_size = shape_of(weights, required[0])
        if hidden_size % HEAD_DIM:
            raise CheckpointError(f"CLIP text encoder width {hidden_size} is not a multiple of {HEAD_DIM}")
        projection = shape_of(weights, "text_projection.weight")[0] if "text_projection.weight" in weights else None
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=1 + max(int(m[1]) for k in weights if (m := _LAYER_KEY.match(k))),
            intermediate_size=shape_of(weights, "encoder.layers.0.mlp.fc1.weight")[0],
            max_positions=shape_of(weights, required[1])[0],
            activation=activation,
            projection_dim=projection,
        )


#: OpenAI CLIP ViT-L/14 text encoder (SD1; SDXL's first encoder): 123,060,480 parameters.
CLIP_VIT_L = CLIPTextConfig()
#: OpenCLIP ViT-H/14 text tower, all 24 layers and the projection: 354,032,640 parameters.
OPENCLIP_VIT_H = CLIPTextConfig(
    hidden_size=1024, num_layers=24, intermediate_size=4096, activation="gelu", projection_dim=1024
)
#: SD2's text encoder: ViT-H without its last layer or projection (see :mod:`.keys.clip`), 340,387,840.
SD2_TEXT = replace(OPENCLIP_VIT_H, num_layers=23, projection_dim=None)
#: OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder): 694,659,840 parameters.
OPENCLIP_VIT_BIGG = CLIPTextConfig(
    hidden_size=1280, num_layers=32, intermediate_size=5120, activation="gelu", projection_dim=1280
)


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def _gelu(x: Tensor) -> Tensor:
    """The exact (erf) GELU of OpenCLIP's ``nn.GELU``."""
    return F.gelu(x)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"quick_gelu": quick_gelu, "gelu": _gelu}


class CLIPTextOutput(NamedTuple):
    """What the text transformer returns (a tuple, so tracing and ONNX export see plain tensors)."""

    hidden: Tensor
    """``[batch, tokens, hidden]``: the states the UNet cross-attends to (per ``clip_skip``)."""
    pooled: Tensor
    """``[batch, hidden or projection_dim]``: final-normed state at the end-of-text token, projected."""


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """``[batch, tokens]`` ids -> ``[batch, tokens, hidden]``; positions are ``0..tokens-1``.

        Checkpoints' stored ``position_ids`` buffers are ignored (some merged files carry
        corrupted ones); positions are always counted here, as transformers now does.
        """
        tokens: Tensor = self.token_embedding(input_ids)
        return tokens + self.position_embedding.weight[: input_ids.shape[-1]]


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention (each token sees itself and the tokens before it)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def _heads(self, x: Tensor) -> Tensor:
        """``[b, n, heads * d]`` -> ``[b, heads, n, d]``."""
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d) + causal mask) v, per head, then the output projection."""
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        projected: Tensor = self.out_proj(out.transpose(1, 2).flatten(2))
        return projected


class CLIPMLP(nn.Module):
    """Position-wise feed-forward: fc1 -> activation -> fc2."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        """``fc2(act(fc1(x)))``."""
        out: Tensor = self.fc2(self.activation(self.fc1(x)))
        return out


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """One residual attention block and one residual MLP block."""
        x = x + self.self_attn(self.layer_norm1(x))
        out: Tensor = x + self.mlp(self.layer_norm2(x))
        return out


class CLIPEncoder(nn.Module):
    """The stack of layers (a module only so parameter names read ``encoder.layers.N``)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_layers))


class CLIPTextTransformer(nn.Module):
    """The CLIP text encoder: ids -> (hidden states for cross-attention, pooled embedding)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.text_projection = (
            None if config.projection_dim is None else nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        )

    def forward(self, input_ids: Tensor, clip_skip: int = 1, final_norm: bool = True) -> CLIPTextOutput:
        """Encode ``[batch, tokens]`` ids (at most ``max_positions`` tokens).

        Args:
            input_ids: token ids, each sequence holding its end-of-text token as its
                highest id (CLIP's tokenizer guarantees it; pooling looks there).
            clip_skip: A1111/ComfyUI "clip skip": ``hidden`` is the output of layer
                ``-clip_skip``, i.e. transformers' ``hidden_states[-clip_skip]``; 1 is the last
                layer, 2 the penultimate (diffusers' ``clip_skip=k`` is our ``k + 1``).
            final_norm: pass ``hidden`` through ``final_layer_norm``, as SD1/SD2 and A1111's clip
                skip do (REFERENCE.md). SDXL feeds both encoders' penultimate layer *without*
                it: ``clip_skip=2, final_norm=False`` (diffusers ``hidden_states[-2]``;
                ComfyUI ``layer_idx=-2, layer_norm_hidden_state=False``).

        ``pooled`` always comes from the last layer, whatever ``clip_skip`` says.
        """
        keep = self._layers_to_keep(clip_skip)
        if input_ids.shape[-1] > self.config.max_positions:
            raise InvalidRequest(
                f"{input_ids.shape[-1]} tokens exceed the text encoder's {self.config.max_positions} positions; "
                "split long prompts into chunks"
            )
        x = self.embeddings(input_ids)
        hidden = x
        for index, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            if index == keep:
                hidden = x
        last: Tensor = self.final_layer_norm(x)
        if final_norm:
            hidden = last if keep == self.config.num_layers else self.final_layer_norm(hidden)
        return CLIPTextOutput(hidden, self._pool(last, input_ids))

    def _layers_to_keep(self, clip_skip: int) -> int:
        """How many layers produce ``hidden``: ``hidden_states[-clip_skip]`` of ``num_layers + 1``."""
        layers = self.config.num_layers
        if not 1 <= clip_skip <= layers:
            raise InvalidRequest(f"clip skip must be between 1 and {layers} for this text encoder, got {clip_skip}")
        return layers - clip_skip + 1

    def _pool(self, last: Tensor, input_ids: Tensor) -> Tensor:
        """The state at each sequence's end-of-text token (its first highest id), projected."""
        # int32 argmax as transformers does: ONNX opset 14's ArgMax refuses int64 inputs.
        eos = input_ids.to(torch.int32).argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        if self.text_projection is None:
            return pooled
        projected: Tensor = self.text_projection(pooled)
        return projected


def load_clip_text(
    weights: Mapping[str, Tensor],
    activation: Activation,
    *,
    config: CLIPTextConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    what: str = "CLIP text encoder",
) -> CLIPTextTransformer:
    """Build the text transformer for ``weights`` (transformers names, see :mod:`.keys.clip`).

    The config is read from the weights unless given; giving it (e.g. :data:`CLIP_VIT_L`)
    also catches a checkpoint whose last layers are missing. Any missing, unexpected or
    misshapen tensor is a :class:`CheckpointError`; nothing loads partially. Each tensor is
    read once and moved straight into the model (``assign``), without a second copy.
    """
    built = config or CLIPTextConfig.from_state_dict(weights, activation, what)
    model = load_module(lambda: CLIPTextTransformer(built), weights, what, device=device, dtype=dtype)
    assert isinstance(model, CLIPTextTransformer)
    return model
