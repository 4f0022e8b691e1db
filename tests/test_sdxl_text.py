"""SDXL's text encoders (stable_diffusion/text_xl.py) against diffusers' ``encode_prompt``.

Tiny random transformers encoders with CLIP's 49408-token vocabulary (so the shipped tokenizer
works) and the family conventions (heads of 64; quick_gelu for CLIP-L, gelu for bigG):
branch 0 a ``CLIPTextModel`` of width 128, branch 1 a ``CLIPTextModelWithProjection`` of width
192 projected to 96, three layers each. They are loaded into ours through
``keys.clip.from_transformers``. The reference is diffusers' own
``StableDiffusionXLPipeline.encode_prompt`` (and the refiner's
``StableDiffusionXLImg2ImgPipeline`` with ``text_encoder=None``), built around these encoders
and tokenizers with ``unet``, ``vae`` and ``scheduler`` left ``None``: ``encode_prompt`` touches
none of them, so no tiny UNet or VAE is needed.

With transformers 5 diffusers' ``encode_prompt`` works as it did with 4, ``clip_skip`` path
included (``CLIPTextModelWithProjection`` still returns ``text_embeds`` first and
``hidden_states`` on request). Measured differences are 0 or float rounding (< 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from sd_fixtures import hf_clip_tokenizer, randomize, write_clip_tokenizer_files
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning, TextEncoder
from latentrt.plugins.stable_diffusion.clip import load_clip_text
from latentrt.plugins.stable_diffusion.keys.clip import from_transformers
from latentrt.plugins.stable_diffusion.text_xl import SDXLTextEncoder, TextBranch
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # the tolerance for text-encoder outputs
WIDTH_L, WIDTH_G, PROJECTION = 128, 192, 96
CONTEXT = WIDTH_L + WIDTH_G
PROMPT = "a photo of a cat"
CAT_POSITION = 5  # BOS a photo of a cat


def clip_config(width: int, activation: str, pad_token_id: int, projection: int | None = None) -> Any:
    return transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=width // 64,
        max_position_embeddings=77,
        hidden_act=activation,
        layer_norm_eps=1e-5,
        projection_dim=projection or 512,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


@dataclass(frozen=True)
class Models:
    """The transformers references, diffusers pipelines over them, and ours loaded from them."""

    clip_l: Any
    big_g: Any
    tokenizer: Any
    tokenizer_2: Any
    base: Any  # diffusers StableDiffusionXLPipeline (text parts only)
    refiner: Any  # diffusers StableDiffusionXLImg2ImgPipeline with text_encoder=None
    ours: SDXLTextEncoder
    ours_refiner: SDXLTextEncoder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    with torch.device("meta"):
        clip_l = transformers.CLIPTextModel(clip_config(WIDTH_L, "quick_gelu", 49407))
        big_g = transformers.CLIPTextModelWithProjection(clip_config(WIDTH_G, "gelu", 0, PROJECTION))
    clip_l, big_g = clip_l.to_empty(device="cpu").eval(), big_g.to_empty(device="cpu").eval()
    randomize(clip_l, 11, bias_std=0.02)
    randomize(big_g, 12, bias_std=0.02)
    for model in (clip_l, big_g):
        model.requires_grad_(False)
        for name, buffer in model.named_buffers():  # meta-built position_ids need real values
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    files = write_clip_tokenizer_files(tmp_path_factory.mktemp("sdxl-text") / "tokenizer")
    tokenizer, tokenizer_2 = hf_clip_tokenizer(files), hf_clip_tokenizer(files, pad_token="!")
    common = dict(vae=None, unet=None, scheduler=None, force_zeros_for_empty_prompt=False, add_watermarker=False)
    base = diffusers.StableDiffusionXLPipeline(
        text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tokenizer, tokenizer_2=tokenizer_2, **common
    )
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        text_encoder=None, text_encoder_2=big_g, tokenizer=None, tokenizer_2=tokenizer_2, **common
    )
    branch_l = TextBranch(
        load_clip_text(from_transformers(clip_l.state_dict()), "quick_gelu"), CLIPTokenizer.from_package()
    )
    branch_g = TextBranch(
        load_clip_text(from_transformers(big_g.state_dict()), "gelu"), CLIPTokenizer.from_package(pad_id=0)
    )
    return Models(
        clip_l,
        big_g,
        tokenizer,
        tokenizer_2,
        base,
        refiner,
        SDXLTextEncoder([branch_l, branch_g]),
        SDXLTextEncoder([branch_g]),
    )


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def encode(encoder: SDXLTextEncoder, prompts: list[str], **kwargs: Any) -> Conditioning:
    with torch.no_grad():
        return encoder.encode(prompts, **kwargs)


def diffusers_encode(pipe: Any, prompt: str, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """diffusers' ``(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)``."""
    kwargs.setdefault("negative_prompt", "")
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True, **kwargs
        )
    return embeds, negative, pooled, negative_pooled


# --- parity with diffusers --------------------------------------------------------------------

CASES = [
    (PROMPT, None, "blurry", None),
    (PROMPT, "an oil painting, dramatic light", "blurry", "lowres, jpeg artifacts"),
    ("portrait of an astronaut riding a horse on mars, 4k", None, "", None),
]


@pytest.mark.parametrize(("prompt", "prompt_2", "negative", "negative_2"), CASES, ids=["plain", "prompt_2", "empty"])
def test_matches_diffusers_encode_prompt(
    models: Models, prompt: str, prompt_2: str | None, negative: str, negative_2: str | None
) -> None:
    embeds, negative_embeds, pooled, negative_pooled = diffusers_encode(
        models.base, prompt, prompt_2=prompt_2, negative_prompt=negative, negative_prompt_2=negative_2
    )
    # diffusers: prompt_2 or prompt, negative_prompt_2 or negative_prompt
    ours = encode(models.ours, [prompt, negative], secondary=[prompt_2 or prompt, negative_2 or negative])
    assert ours.context.shape == (2, 77, CONTEXT)
    assert ours.pooled is not None and ours.pooled.shape == (2, PROJECTION)
    assert ours.extra["text_embeds"] is ours.pooled
    assert max_diff(ours.context[:1], embeds) < TOL
    assert max_diff(ours.context[1:], negative_embeds) < TOL
    assert max_diff(ours.pooled[:1], pooled) < TOL
    assert max_diff(ours.pooled[1:], negative_pooled) < TOL


def test_tokens_match_diffusers_tokenizers(models: Models) -> None:
    """Branch 0 pads with the end token, branch 1 with "!" (id 0), as diffusers' two tokenizers do."""
    text = "an oil painting, dramatic light"
    per_branch = models.ours.tokenize([text])
    for chunks, reference in zip(per_branch, (models.tokenizer, models.tokenizer_2), strict=True):
        expected = reference(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert [chunk.ids for chunk in chunks[0]] == [expected]
    assert per_branch[0][0][0].ids[-1] == 49407 and per_branch[1][0][0].ids[-1] == 0


def test_refiner_matches_diffusers(models: Models) -> None:
    """One bigG branch; ``secondary`` is ignored as diffusers' refiner ignores ``prompt_2``."""
    embeds, negative_embeds, pooled, negative_pooled = diffusers_encode(
        models.refiner, PROMPT, prompt_2="ignored", negative_prompt="blurry"
    )
    ours = encode(models.ours_refiner, [PROMPT, "blurry"], secondary=["ignored", "ignored too"])
    assert ours.context.shape == (2, 77, WIDTH_G) and models.ours_refiner.context_dim == WIDTH_G
    assert max_diff(ours.context, torch.cat([embeds, negative_embeds])) < TOL
    assert ours.pooled is not None
    assert max_diff(ours.pooled, torch.cat([pooled, negative_pooled])) < TOL


def test_clip_skip_counts_from_the_penultimate_layer(models: Models) -> None:
    """Our ``clip_skip=1`` is SDXL's default (``hidden_states[-2]``); our 2 is diffusers' ``clip_skip=1``."""
    default, _, pooled, _ = diffusers_encode(models.base, PROMPT)
    skipped, _, skipped_pooled, _ = diffusers_encode(models.base, PROMPT, clip_skip=1)
    assert max_diff(encode(models.ours, [PROMPT], clip_skip=1).context, default) < TOL
    ours = encode(models.ours, [PROMPT], clip_skip=2)
    assert max_diff(ours.context, skipped) < TOL
    assert max_diff(default, skipped) > 0.1  # the layers differ, so this checks something
    assert ours.pooled is not None and max_diff(ours.pooled, skipped_pooled) < TOL
    assert max_diff(skipped_pooled, pooled) == 0.0  # pooled always from the last layer


# --- A1111 weighting and long prompts ---------------------------------------------------------


def test_weight_scales_only_its_token_and_keeps_the_mean(models: Models) -> None:
    plain = encode(models.ours, [PROMPT])
    weighted = encode(models.ours, ["a photo of a (cat:1.5)"])
    ids = [[chunk.ids for chunk in chunks[0]] for chunks in models.ours.tokenize([PROMPT])]
    assert ids == [[chunk.ids for chunk in chunks[0]] for chunks in models.ours.tokenize(["a photo of a (cat:1.5)"])]
    others = [i for i in range(77) if i != CAT_POSITION]
    for channels in (slice(0, WIDTH_L), slice(WIDTH_L, CONTEXT)):  # each branch on its own
        before, after = plain.context[0, :, channels], weighted.context[0, :, channels]
        assert math.isclose(float(after.mean()), float(before.mean()), rel_tol=1e-5, abs_tol=1e-6)
        # every other token is only rescaled by the mean-restoring factor...
        scale = float((after[others] * before[others]).sum() / (before[others] ** 2).sum())
        assert scale != pytest.approx(1.0, abs=1e-4)
        assert max_diff(after[others], scale * before[others]) < TOL
        # ...and the weighted one by 1.5 times it
        assert max_diff(after[CAT_POSITION], 1.5 * scale * before[CAT_POSITION]) < TOL
    assert plain.pooled is not None and weighted.pooled is not None
    assert max_diff(weighted.pooled, plain.pooled) == 0.0  # A1111: pooled is not weighted


def test_long_prompt_is_two_chunks_in_both_branches(models: Models) -> None:
    """100 tokens: chunk 0 is diffusers' truncated encoding, chunk 1 the remaining 25 tokens'."""
    long_prompt = " ".join([PROMPT] * 20)
    assert len(models.ours.branches[0].tokenizer.encode(long_prompt)) == 100
    per_branch = models.ours.tokenize([long_prompt])
    assert [len(chunks[0]) for chunks in per_branch] == [2, 2]
    ours = encode(models.ours, [long_prompt])
    assert ours.context.shape == (1, 154, CONTEXT)
    head, _, pooled, _ = diffusers_encode(models.base, long_prompt)  # truncated to the first 75 tokens
    tail, _, _, _ = diffusers_encode(models.base, " ".join([PROMPT] * 5))
    assert max_diff(ours.context[:, :77], head) < TOL
    assert max_diff(ours.context[:, 77:], tail) < TOL
    assert ours.pooled is not None and max_diff(ours.pooled, pooled) < TOL  # from the first chunk


def test_branches_pad_to_the_same_chunk_count(models: Models) -> None:
    """A long prompt with a short secondary: bigG's second chunk is an empty prompt's encoding."""
    long_prompt = " ".join([PROMPT] * 20)
    per_branch = models.ours.tokenize([long_prompt], secondary=["a dog"])
    assert [len(chunks[0]) for chunks in per_branch] == [2, 2]
    ours = encode(models.ours, [long_prompt], secondary=["a dog"])
    empty = encode(models.ours, [""])
    alone = encode(models.ours, [long_prompt])
    assert ours.context.shape == (1, 154, CONTEXT)
    assert max_diff(ours.context[..., :WIDTH_L], alone.context[..., :WIDTH_L]) == 0.0
    assert max_diff(ours.context[:, 77:, WIDTH_L:], empty.context[..., WIDTH_L:]) < TOL


def test_secondary_changes_only_the_last_branch(models: Models) -> None:
    same = encode(models.ours, [PROMPT])
    other = encode(models.ours, [PROMPT], secondary=["a dog in the snow"])
    assert max_diff(other.context[..., :WIDTH_L], same.context[..., :WIDTH_L]) == 0.0
    assert max_diff(other.context[..., WIDTH_L:], same.context[..., WIDTH_L:]) > 0.1
    assert same.pooled is not None and other.pooled is not None
    assert max_diff(other.pooled, same.pooled) > 0.1  # pooled is bigG's, so it follows the secondary prompt
    assert max_diff(encode(models.ours, [PROMPT], secondary=[PROMPT]).context, same.context) == 0.0


def test_batch_pads_chunks_and_each_prompt_is_independent(models: Models) -> None:
    long_prompt = " ".join([PROMPT] * 20)
    batch = encode(models.ours, ["a (cat:1.3)", long_prompt])
    alone = encode(models.ours, ["a (cat:1.3)"])
    empty = encode(models.ours, [""])
    assert batch.context.shape == (2, 154, CONTEXT)
    assert max_diff(batch.context[:1, :77], alone.context) < 1e-5  # emphasis mean is per prompt
    assert max_diff(batch.context[:1, 77:], empty.context) < 1e-5
    assert batch.pooled is not None and alone.pooled is not None
    assert max_diff(batch.pooled[:1], alone.pooled) < 1e-5


# --- protocol and bad input -------------------------------------------------------------------


def test_is_a_text_encoder(models: Models) -> None:
    assert isinstance(models.ours, TextEncoder)
    assert models.ours.context_dim == CONTEXT
    assert models.ours.max_clip_skip == 2


def test_bad_requests(models: Models) -> None:
    with pytest.raises(InvalidRequest, match="not a single string"):
        models.ours.encode(PROMPT)
    with pytest.raises(InvalidRequest, match="not a single string"):
        models.ours.encode([PROMPT], secondary="a dog")
    with pytest.raises(InvalidRequest, match="2 prompts but 1 secondary"):
        models.ours.encode([PROMPT, "x"], secondary=["a dog"])
    with pytest.raises(InvalidRequest, match="at least one prompt"):
        models.ours.encode([])
    for clip_skip in (0, 3):
        with pytest.raises(InvalidRequest, match=r"clip skip must be between 1 and 2 .*penultimate"):
            models.ours.encode([PROMPT], clip_skip=clip_skip)
    with pytest.raises(InvalidRequest, match="prompt weight"):
        models.ours.encode(["(cat:1.2.3)"])
    with pytest.raises(ValueError, match="at least one text branch"):
        SDXLTextEncoder([])


def test_default_device_is_cpu(models: Models) -> None:
    assert SDXLTextEncoder(models.ours.branches).device == torch.device("cpu")
