"""CLIP text transformer (stable_diffusion/clip.py) and its checkpoint layouts (keys/clip.py).

Parity against transformers' ``CLIPTextModel``/``CLIPTextModelWithProjection`` with tiny random
weights (hidden 128 = 2 heads of 64, 3 layers), against OpenCLIP's ``TextTransformer`` when
``open_clip_torch`` is installed, and full-size parameter counts on the ``meta`` device.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from latentrt.core.checkpoint import SafetensorsFile, TensorSource
from latentrt.core.errors import CheckpointError, InvalidRequest
from latentrt.plugins.stable_diffusion.clip import (
    CLIP_VIT_L,
    OPENCLIP_VIT_BIGG,
    OPENCLIP_VIT_H,
    SD2_TEXT,
    Activation,
    CLIPTextConfig,
    CLIPTextTransformer,
    load_clip_text,
)
from latentrt.plugins.stable_diffusion.keys.clip import (
    OPENCLIP_SD2_PREFIX,
    OPENCLIP_SDXL_PREFIX,
    SD1_CLIP_PREFIX,
    ClipWeights,
    from_openclip,
    from_transformers,
    sd1_text_weights,
    sd2_text_weights,
    sdxl_text_weights,
)

transformers = pytest.importorskip("transformers")

VOCAB, EOS, BOS = 1000, 999, 998
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_config(activation: Activation, *, layers: int = 3, projection: int = 64) -> object:
    """A tiny transformers CLIPTextConfig following the family conventions (heads of 64)."""
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=activation,
        layer_norm_eps=1e-5,
        projection_dim=projection,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
    )


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Make every weight distinct (biases, layer norms too) so a mis-wired tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def hf_model(activation: Activation, projection: bool, seed: int = 0) -> nn.Module:
    """A random transformers text encoder (with or without ``text_projection``)."""
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return perturbed(cls(hf_config(activation)), seed)


def token_ids() -> Tensor:
    """Three prompts of 77 ids: BOS, words, EOS (the highest id), then EOS- or 0-padding (SD1 / OpenCLIP)."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(1, BOS, (3, 77), generator=generator)
    ids[:, 0] = BOS
    for row, (length, pad) in enumerate(((5, EOS), (30, 0), (76, EOS))):
        ids[row, length] = EOS
        ids[row, length + 1 :] = pad
    return ids


def hf_text_model(model: nn.Module) -> nn.Module:
    """The inner ``CLIPTextModel`` (the one holding ``final_layer_norm``)."""
    inner = getattr(model, "text_model", model)
    assert isinstance(inner, nn.Module)
    return inner


def hf_final_norm(model: nn.Module) -> nn.Module:
    """transformers' ``final_layer_norm`` (what A1111's clip skip applies to an earlier layer)."""
    return hf_text_model(model).get_submodule("final_layer_norm")


def hf_reference(model: nn.Module, ids: Tensor) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """transformers' hidden_states, last_hidden_state and pooled (or projected text_embeds)."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return tuple(out.hidden_states), out.last_hidden_state, pooled


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_matches_transformers(activation: Activation, projection: bool) -> None:
    ref = hf_model(activation, projection)
    ours = load_clip_text(from_transformers(ref.state_dict()), activation)
    assert ours.config == CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_layers=3,
        intermediate_size=256,
        activation=activation,
        projection_dim=64 if projection else None,
    )
    ids = token_ids()
    states, last, pooled = hf_reference(ref, ids)
    final_norm = hf_final_norm(ref)
    with torch.no_grad():
        out = ours(ids)
        assert max_diff(out.hidden, last) < TOL
        assert max_diff(out.pooled, pooled) < TOL
        for skip in (2, 3):  # A1111 clip skip: hidden_states[-skip], then the final layer norm
            assert max_diff(ours(ids, clip_skip=skip).hidden, final_norm(states[-skip])) < TOL
            skipped = ours(ids, clip_skip=skip, final_norm=False)
            assert max_diff(skipped.hidden, states[-skip]) < TOL  # SDXL: penultimate, no norm
            assert max_diff(skipped.pooled, pooled) < TOL  # pooled always from the last layer


def test_state_dict_names_match_transformers_and_prefixes_strip() -> None:
    ref = hf_model("quick_gelu", projection=True)
    hf_names = {k.removeprefix("text_model.") for k in ref.state_dict()}
    ours = CLIPTextTransformer(CLIPTextConfig(vocab_size=VOCAB, hidden_size=128, num_layers=3, intermediate_size=256))
    assert set(ours.state_dict()) == hf_names - {"text_projection.weight"}
    # An SD1 single file: prefix + text_model. + an old position_ids buffer, beside other components.
    sd1 = {SD1_CLIP_PREFIX + "text_model." + k: v for k, v in hf_text_model(ref).state_dict().items()}
    sd1[SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None].float() * 1.5
    sd1["model.diffusion_model.out.2.weight"] = torch.zeros(4)
    weights = sd1_text_weights(sd1)
    assert set(weights) == set(ours.state_dict())
    ids = token_ids()
    with torch.no_grad():
        expected = hf_text_model(ref)(ids).last_hidden_state
    assert max_diff(load_clip_text(weights, "quick_gelu")(ids).hidden, expected) < TOL


def to_openclip(hf_state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Written independently of keys/clip.py: a transformers state dict in OpenCLIP's layout."""
    hf = {k.removeprefix("text_model."): v for k, v in hf_state.items()}
    out = {
        "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_final.weight": hf["final_layer_norm.weight"],
        "ln_final.bias": hf["final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(4.6052),
    }
    layers = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers."))
    for n in range(layers):
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for p in ("weight", "bias"):
            qkv = [hf[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"]
            out[f"{dst}attn.in_proj_{p}"] = torch.cat(qkv)
            for theirs, ours in (
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("attn.out_proj", "self_attn.out_proj"),
            ):
                out[f"{dst}{theirs}.{p}"] = hf[f"{src}{ours}.{p}"]
            out[f"{dst}mlp.c_fc.{p}"] = hf[f"{src}mlp.fc1.{p}"]
            out[f"{dst}mlp.c_proj.{p}"] = hf[f"{src}mlp.fc2.{p}"]
    return {prefix + k: v for k, v in out.items()}


class CountingSource(TensorSource):
    """An in-memory tensor source that, like a safetensors file, knows shapes without reading."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.reads: Counter[str] = Counter()

    def __getitem__(self, key: str) -> Tensor:
        self.reads[key] += 1
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype


def test_openclip_layout_sdxl_bigg() -> None:
    ref = hf_model("gelu", projection=True, seed=1)
    tensors = to_openclip(ref.state_dict(), OPENCLIP_SDXL_PREFIX)
    checkpoint = CountingSource(tensors | {"conditioner.embedders.0.transformer.text_model.x": torch.ones(3)})
    weights = from_openclip(checkpoint, OPENCLIP_SDXL_PREFIX)
    assert weights.shape("text_projection.weight") == (64, 128)
    assert not checkpoint.reads
    ours = load_clip_text(weights, "gelu")
    # Lazy: shape checks read nothing more, every loaded tensor is read once (stacked q/k/v too),
    # and q/k/v parameters own their storage instead of pinning the stacked tensor.
    assert checkpoint.reads == Counter(k for k in tensors if not k.endswith("logit_scale"))
    q_proj = ours.get_parameter("encoder.layers.0.self_attn.q_proj.weight")
    assert q_proj.untyped_storage().nbytes() == 128 * 128 * 4
    ids = token_ids()
    states, last, pooled = hf_reference(ref, ids)
    with torch.no_grad():
        assert max_diff(ours(ids).hidden, last) < TOL
        sdxl = ours(ids, clip_skip=2, final_norm=False)  # what SDXL's UNet gets from bigG
    assert max_diff(sdxl.hidden, states[-2]) < TOL
    assert max_diff(sdxl.pooled, pooled) < TOL  # SDXL's text_embeds


def test_sd2_drops_last_layer_like_diffusers() -> None:
    """SD2: 23 of 24 layers, no projection; default output == final norm of the penultimate layer."""
    ref = hf_model("gelu", projection=True, seed=2)
    weights = sd2_text_weights(to_openclip(ref.state_dict(), OPENCLIP_SD2_PREFIX))
    assert "text_projection.weight" not in weights
    assert not any(k.startswith("encoder.layers.2.") for k in weights)
    ours = load_clip_text(weights, "gelu")
    assert (ours.config.num_layers, ours.config.projection_dim) == (2, None)
    ids = token_ids()
    states, _, _ = hf_reference(ref, ids)
    with torch.no_grad():
        expected = hf_final_norm(ref)(states[-2])
        assert max_diff(ours(ids).hidden, expected) < TOL


def test_sdxl_text_weights_splits_both_encoders() -> None:
    clip_l, big_g = hf_model("quick_gelu", projection=False, seed=3), hf_model("gelu", projection=True, seed=4)
    checkpoint = to_openclip(big_g.state_dict(), OPENCLIP_SDXL_PREFIX)
    checkpoint |= {"conditioner.embedders.0.transformer.text_model." + k: v for k, v in clip_l.state_dict().items()}
    first, second = sdxl_text_weights(checkpoint)
    ids = token_ids()
    with torch.no_grad():
        cases: list[tuple[ClipWeights, Activation, nn.Module]] = [
            (first, "quick_gelu", clip_l),
            (second, "gelu", big_g),
        ]
        for weights, activation, ref in cases:
            states, _, _ = hf_reference(ref, ids)
            hidden = load_clip_text(weights, activation)(ids, clip_skip=2, final_norm=False).hidden
            assert max_diff(hidden, states[-2]) < TOL


def test_lazy_safetensors_fp16_file(tmp_path: Path) -> None:
    """A memory-mapped fp16 OpenCLIP file loads as fp32 through the lazy views."""
    ref = hf_model("gelu", projection=True, seed=5)
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v.half() for k, v in to_openclip(ref.state_dict(), OPENCLIP_SDXL_PREFIX).items()}, str(path))
    source = SafetensorsFile(path)
    ours = load_clip_text(from_openclip(source, OPENCLIP_SDXL_PREFIX), "gelu")
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    with torch.no_grad():
        for param in ref.parameters():
            param.copy_(param.half().float())
        _, last, pooled = hf_reference(ref, token_ids())
        out = ours(token_ids())
    assert max_diff(out.hidden, last) < TOL
    assert max_diff(out.pooled, pooled) < TOL


def open_clip_text_transformer(monkeypatch: pytest.MonkeyPatch) -> Callable[..., nn.Module]:
    """open_clip's own ``TextTransformer`` (test-only, when ``open_clip_torch`` is installed).

    Its ``transformer.py`` needs torchvision only for vision-tower helpers; where torchvision
    is absent the module is loaded alone under a stand-in package with a stub for that import.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    if importlib.util.find_spec("torchvision") is None:
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = nn.BatchNorm2d  # type: ignore[attr-defined]
        for name in ("torchvision", "torchvision.ops"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, misc.__name__, misc)
    package = types.ModuleType("_open_clip_reference")
    package.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, package.__name__, package)
    module = importlib.import_module(f"{package.__name__}.transformer")
    text_transformer: Callable[..., nn.Module] = module.TextTransformer
    return text_transformer


def test_matches_open_clip_text_transformer(monkeypatch: pytest.MonkeyPatch) -> None:
    text_transformer = open_clip_text_transformer(monkeypatch)
    torch.manual_seed(6)
    ref = text_transformer(vocab_size=VOCAB, width=128, heads=2, layers=3, output_dim=64, output_tokens=True)
    ref = perturbed(ref, 6)
    ours = load_clip_text(from_openclip({"m." + k: v for k, v in ref.state_dict().items()}, "m."), "gelu")
    captured: list[Tensor] = []
    ref.get_submodule("transformer.resblocks.1").register_forward_hook(lambda _m, _i, out: captured.append(out))
    ids = token_ids()
    with torch.no_grad():
        pooled, tokens = ref(ids)
        assert max_diff(ours(ids).hidden, tokens) < TOL
        assert max_diff(ours(ids).pooled, pooled) < TOL
        assert max_diff(ours(ids, clip_skip=2, final_norm=False).hidden, captured[0]) < TOL


FULL_SIZE = [
    (
        CLIP_VIT_L,
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        123_060_480,
    ),
    (
        SD2_TEXT,
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
        340_387_840,
    ),
    (
        OPENCLIP_VIT_H,
        dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, projection_dim=1024
        ),
        354_032_640,
    ),
    (
        OPENCLIP_VIT_BIGG,
        dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
        ),
        694_659_840,
    ),
]


@pytest.mark.parametrize(("config", "hf_kwargs", "count"), FULL_SIZE, ids=["clip-l", "sd2", "vit-h", "bigg"])
def test_full_size_parameter_counts(config: CLIPTextConfig, hf_kwargs: dict[str, int], count: int) -> None:
    projection = "projection_dim" in hf_kwargs
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    with torch.device("meta"):
        ours = CLIPTextTransformer(config)
        ref = cls(transformers.CLIPTextConfig(**hf_kwargs))
    assert config.num_heads == hf_kwargs["num_attention_heads"]
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k.removeprefix("text_model."): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == count


# --- bad input ---------------------------------------------------------------------------


def tiny_state() -> dict[str, Tensor]:
    return dict(hf_model("quick_gelu", projection=False).state_dict())


def test_missing_layer_key_is_named() -> None:
    state = tiny_state()
    del state["encoder.layers.1.mlp.fc1.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing: encoder\.layers\.1\.mlp\.fc1\.weight"):
        load_clip_text(from_transformers(state), "quick_gelu")


def test_misshapen_tensor_is_named_in_both_layouts() -> None:
    state = tiny_state()
    state["encoder.layers.2.self_attn.out_proj.weight"] = torch.zeros(128, 127)
    with pytest.raises(
        CheckpointError, match=r"misshapen: encoder\.layers\.2\.self_attn\.out_proj\.weight \(128, 127\)"
    ):
        load_clip_text(from_transformers(state), "quick_gelu")
    openclip = to_openclip(dict(hf_model("gelu", projection=True).state_dict()), OPENCLIP_SD2_PREFIX)
    openclip[OPENCLIP_SD2_PREFIX + "transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(255, 128)
    with pytest.raises(
        CheckpointError,
        match=r"mlp\.fc1\.weight \[cond_stage_model\.model\.transformer\.resblocks\.1\.mlp\.c_fc\.weight\]",
    ):
        load_clip_text(from_openclip(openclip, OPENCLIP_SD2_PREFIX), "gelu")


def test_other_bad_inputs() -> None:
    state = tiny_state()
    with pytest.raises(CheckpointError, match=r"unexpected: encoder\.layers\.0\.extra\.weight"):
        load_clip_text(from_transformers(state | {"encoder.layers.0.extra.weight": torch.zeros(1)}), "quick_gelu")
    with pytest.raises(CheckpointError, match=r"missing: encoder\.layers\.3\."):  # last layers absent
        load_clip_text(
            from_transformers(state),
            "quick_gelu",
            config=CLIPTextConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256),
        )
    with pytest.raises(CheckpointError, match="not a float"):
        load_clip_text(
            from_transformers(state | {"final_layer_norm.bias": torch.zeros(128, dtype=torch.int64)}), "quick_gelu"
        )
    with pytest.raises(
        CheckpointError, match=r"no OpenCLIP CLIP text encoder tensors under 'cond_stage_model\.model\.'"
    ):
        sd2_text_weights(state)
    openclip = to_openclip(dict(hf_model("gelu", projection=True).state_dict()), "p.")
    openclip["p.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(128, 128)
    with pytest.raises(CheckpointError, match=r"in_proj_weight: 128 rows cannot be split"):
        from_openclip(openclip, "p.")


def test_bad_requests() -> None:
    ours = load_clip_text(from_transformers(tiny_state()), "quick_gelu")
    with pytest.raises(InvalidRequest, match="clip skip must be between 1 and 3"):
        ours(token_ids(), clip_skip=4)
    with pytest.raises(InvalidRequest, match="78 tokens exceed"):
        ours(torch.zeros(1, 78, dtype=torch.long))
