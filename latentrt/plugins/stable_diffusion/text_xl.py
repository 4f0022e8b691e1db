"""The SDXL text encoder: one prompt through several CLIP branches, contexts joined along channels.

SDXL base conditions on two text encoders, OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14;
the refiner on bigG alone. Each :class:`TextBranch` is one encoder with its own tokenizer
(CLIP-L's pads with ``<|endoftext|>``, bigG's with ``!``, id 0; the tokenizer's ``pad_id``
says which). What the UNet gets (diffusers' ``StableDiffusionXLPipeline.encode_prompt``,
A1111's ``sd_models_xl`` / SGM ``GeneralConditioner``, ComfyUI's ``SDXLClipModel``):

- ``context``: every branch's hidden states of its *penultimate* layer, *without* the final
  layer norm (diffusers ``hidden_states[-2]``), concatenated along channels
  (768 + 1280 = 2048 for the base model, 1280 for the refiner);
- ``pooled`` (the UNet's ``text_embeds``): the last branch's pooled output, i.e. its
  final-normed last layer at the end-of-text token, projected by ``text_projection``.

Long prompts and weights follow A1111 (see :mod:`.prompt` and :mod:`.text`): each branch cuts
its prompt into 75-token chunks, encodes every chunk separately, applies "original"
emphasis per chunk (scale by the token weights, restore the chunk's mean) and the chunks are
concatenated along the token axis. All branches and all prompts of a batch are padded with
empty chunks to the same chunk count, so the per-chunk contexts line up. ``pooled`` comes
from the first chunk and is never weighted, as in A1111 (``zs[0].pooled``).

``clip_skip`` counts from SDXL's default layer: 1 (the default) is the penultimate layer
(``hidden_states[-2]``), 2 the one before (``hidden_states[-3]``), i.e. layer
``-(clip_skip + 1)``. diffusers' ``clip_skip=k`` is our ``k + 1``. It applies to every
branch; ``pooled`` always comes from the last layer.

``secondary`` is diffusers' ``prompt_2`` / ``negative_prompt_2``: the prompts of the last
branch (bigG) when there are several; without it every branch reads ``prompts``. A
single-branch encoder (the refiner) always encodes ``prompts`` and ignores ``secondary``,
as diffusers' refiner does (its ``zip`` pairs ``tokenizer_2`` with ``prompt``).

Deviations, all deliberate:

- The emphasis mean is per prompt, not per batch (as :class:`.text.SDTextEncoder`); with no
  weights both are the identity.
- diffusers ignores ``clip_skip`` for negative prompts (they always use
  ``hidden_states[-2]``); here every prompt of the batch uses the same layer.
- diffusers truncates prompts to 77 tokens; long prompts are chunked here as in A1111 and
  ComfyUI. Short unweighted prompts give diffusers' numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning
from latentrt.plugins.stable_diffusion.clip import CLIPTextTransformer
from latentrt.plugins.stable_diffusion.prompt import PromptChunk, empty_chunk, tokenize_weighted
from latentrt.plugins.stable_diffusion.text import apply_emphasis
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer

__all__ = ["SDXLTextEncoder", "TextBranch"]


@dataclass
class TextBranch:
    """One SDXL text encoder with its tokenizer (CLIP-L pads with EOS, bigG with ``!``)."""

    model: CLIPTextTransformer
    tokenizer: CLIPTokenizer


def _check_prompts(prompts: Sequence[str], what: str) -> list[str]:
    if isinstance(prompts, str):
        raise InvalidRequest(f"encode takes a list of {what}, not a single string")
    return list(prompts)


@dataclass
class SDXLTextEncoder:
    """SDXL's text encoders, implementing the core ``TextEncoder`` protocol (plus ``secondary``).

    ``branches`` is ``[CLIP-L, OpenCLIP bigG]`` for the base model and ``[bigG]`` for the
    refiner; the pooled embedding comes from the last one. See the module docstring.
    """

    branches: Sequence[TextBranch]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if not self.branches:
            raise ValueError("SDXLTextEncoder needs at least one text branch")

    @property
    def context_dim(self) -> int:
        """Channels of the context: the sum of the branches' widths (2048 for SDXL base)."""
        return sum(branch.model.config.hidden_size for branch in self.branches)

    @property
    def max_clip_skip(self) -> int:
        """The largest ``clip_skip`` every branch supports (its layer count minus one)."""
        return min(branch.model.config.num_layers for branch in self.branches) - 1

    def branch_prompts(self, prompts: Sequence[str], secondary: Sequence[str] | None = None) -> list[list[str]]:
        """The prompts each branch encodes: the last branch reads ``secondary`` when given."""
        first = _check_prompts(prompts, "prompts")
        if not first:
            raise InvalidRequest("encode needs at least one prompt")
        per_branch = [first] * len(self.branches)
        if secondary is not None:
            second = _check_prompts(secondary, "secondary prompts")
            if len(second) != len(first):
                raise InvalidRequest(
                    f"got {len(first)} prompts but {len(second)} secondary prompts; "
                    "give one secondary prompt per prompt"
                )
            if len(self.branches) > 1:
                per_branch[-1] = second
        return per_branch

    def tokenize(self, prompts: Sequence[str], secondary: Sequence[str] | None = None) -> list[list[list[PromptChunk]]]:
        """``[branch][prompt][chunk]``: every branch's chunks, all padded to one chunk count."""
        per_branch = [
            [tokenize_weighted(branch.tokenizer, prompt) for prompt in branch_prompts]
            for branch, branch_prompts in zip(self.branches, self.branch_prompts(prompts, secondary), strict=True)
        ]
        count = max(len(chunks) for prompt_chunks in per_branch for chunks in prompt_chunks)
        return [
            [
                [*chunks, *(empty_chunk(branch.tokenizer) for _ in range(count - len(chunks)))]
                for chunks in prompt_chunks
            ]
            for branch, prompt_chunks in zip(self.branches, per_branch, strict=True)
        ]

    def encode(
        self, prompts: Sequence[str], *, clip_skip: int = 1, secondary: Sequence[str] | None = None
    ) -> Conditioning:
        """``context`` ``[batch, 77 * chunks, sum of widths]``, ``pooled`` ``[batch, projection]``.

        ``extra["text_embeds"]`` is ``pooled`` (the SDXL UNet's name for it).
        """
        if not 1 <= clip_skip <= self.max_clip_skip:
            raise InvalidRequest(
                f"clip skip must be between 1 and {self.max_clip_skip} for SDXL's text encoders "
                f"(1 = SDXL's default penultimate layer), got {clip_skip}"
            )
        per_branch = self.tokenize(prompts, secondary)
        chunk_count = len(per_branch[0][0])
        contexts: list[Tensor] = []
        pooled: Tensor | None = None
        for index in range(chunk_count):
            hiddens = []
            for branch, prompt_chunks in zip(self.branches, per_branch, strict=True):
                ids = torch.tensor([chunks[index].ids for chunks in prompt_chunks], device=self.device)
                weights = torch.tensor([chunks[index].weights for chunks in prompt_chunks], device=self.device)
                out = branch.model(ids, clip_skip=clip_skip + 1, final_norm=False)
                hiddens.append(apply_emphasis(out.hidden, weights))
                if index == 0:
                    pooled = out.pooled  # the last branch's wins
            contexts.append(torch.cat(hiddens, dim=-1))
        assert pooled is not None
        return Conditioning(context=torch.cat(contexts, dim=1), pooled=pooled, extra={"text_embeds": pooled})
