"""The SD1/SD2 text encoder: A1111 prompt syntax -> 77-token chunks -> CLIP -> weighted context.

Follows A1111's ``FrozenCLIPEmbedderWithCustomWords``: every prompt is cut into chunks of
75 tokens (BOS + 75 + EOS = 77), each chunk is encoded on its own, the hidden states are
multiplied by the per-token weights and rescaled to keep their mean ("original"
emphasis), and the chunks are concatenated along the token axis. Prompts and negative
prompts encoded together are padded with empty chunks to the same chunk count.

One deliberate difference from A1111: the emphasis mean is taken per prompt, not over
the whole batch, so an image never depends on the other prompts in its batch. With no
weighting (all weights 1) both are the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning
from latentrt.plugins.stable_diffusion.clip import CLIPTextTransformer
from latentrt.plugins.stable_diffusion.prompt import PromptChunk, pad_chunk_counts, tokenize_weighted
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer

__all__ = ["SDTextEncoder", "apply_emphasis"]


def apply_emphasis(hidden: Tensor, weights: Tensor) -> Tensor:
    """A1111's "original" emphasis, per prompt: scale each token, then restore the prompt's mean.

    ``hidden`` is ``[batch, tokens, channels]``, ``weights`` ``[batch, tokens]``.
    """
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * weights.unsqueeze(-1).to(hidden)
    return weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))


@dataclass
class SDTextEncoder:
    """CLIP text transformer + tokenizer implementing the core ``TextEncoder`` protocol.

    ``clip_skip`` counts from the last layer as A1111 and ComfyUI do (1 = last layer).
    """

    model: CLIPTextTransformer
    tokenizer: CLIPTokenizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def tokenize(self, prompts: Sequence[str]) -> list[list[PromptChunk]]:
        """Every prompt as chunks, padded to a common chunk count."""
        if isinstance(prompts, str):
            raise InvalidRequest("encode takes a list of prompts, not a single string")
        chunks = [tokenize_weighted(self.tokenizer, prompt) for prompt in prompts]
        return pad_chunk_counts(chunks, self.tokenizer)

    def encode(
        self, prompts: Sequence[str], *, clip_skip: int = 1, secondary: Sequence[str] | None = None
    ) -> Conditioning:
        """``[batch, 77 * chunks, channels]`` context for ``prompts`` (A1111 syntax)."""
        if secondary is not None:
            raise InvalidRequest("prompt_2 / negative_prompt_2 need a model with two text encoders (SDXL)")
        per_prompt = self.tokenize(prompts)
        contexts = []
        for index in range(len(per_prompt[0]) if per_prompt else 0):
            ids = torch.tensor([chunks[index].ids for chunks in per_prompt], device=self.device)
            weights = torch.tensor([chunks[index].weights for chunks in per_prompt], device=self.device)
            hidden = self.model(ids, clip_skip=clip_skip).hidden
            contexts.append(apply_emphasis(hidden, weights))
        if not contexts:
            raise InvalidRequest("encode needs at least one prompt")
        return Conditioning(context=torch.cat(contexts, dim=1))
