"""Reading model files: single-file checkpoints, diffusers folders, standalone VAEs.

Tensors are read lazily: a ``.safetensors`` file is memory-mapped (``safetensors.safe_open``)
and a tensor is materialized only when asked for, so loading a checkpoint into a model
never holds a second full copy. Shapes and dtypes can be inspected without reading any
tensor data, which is how model families are detected.

Every failure a user can cause (missing, truncated or corrupt file, unknown format,
missing or misshapen tensors) is a :class:`~latentrt.core.errors.CheckpointError` naming
the file and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from latentrt.core.errors import CheckpointError
from latentrt.core.layerwise import install_layerwise_casting, storage_dtype, stored_parameter_names
from latentrt.core.memory import file_mappings, release_file_pages
from latentrt.core.offload import file_back_loaded

__all__ = [
    "PICKLE_SUFFIXES",
    "Checkpoint",
    "PrefixView",
    "SafetensorsFile",
    "TensorDict",
    "TensorFile",
    "TensorSource",
    "TorchPickleFile",
    "check_tensors",
    "describe",
    "dtype_of",
    "load_module",
    "shape_of",
    "diffusers_component",
    "file_sha256",
    "model_hash",
    "open_checkpoint",
    "open_tensors",
    "read_json",
]

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorSource(Mapping[str, Tensor]):
    """A read-only, lazy mapping of tensor names to tensors, with shapes known up front."""

    description: str = "tensors"

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading its data."""
        return tuple(self[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of ``key`` without reading its data."""
        return self[key].dtype

    def with_prefix(self, prefix: str) -> PrefixView:
        """The tensors under ``prefix``, with the prefix stripped."""
        return PrefixView(self, prefix)

    def has_prefix(self, prefix: str) -> bool:
        """Whether any tensor name starts with ``prefix``."""
        return any(key.startswith(prefix) for key in self)

    def name_in_source(self, key: str) -> str:
        """``key`` as the underlying file spells it (for error messages)."""
        return key


class TensorDict(TensorSource):
    """Tensors already in memory (renamed or reshaped from a file), keeping the file's description."""

    def __init__(self, tensors: Mapping[str, Tensor], description: str, names: Mapping[str, str] | None = None) -> None:
        self._tensors = dict(tensors)
        self.description = description
        self._names = dict(names or {})

    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def name_in_source(self, key: str) -> str:
        """The file's name for ``key`` when it was renamed."""
        return self._names.get(key, key)


class _ListedSource(TensorSource):
    """A source whose names are listed up front (``_names``, in file order, and a set for lookups)."""

    _names: list[str]
    _index: set[str]

    def _list(self, names: Iterable[str]) -> None:
        self._names = list(names)
        self._index = set(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._index


class SafetensorsFile(_ListedSource):
    """A memory-mapped ``.safetensors`` file (``open_tensors`` strips a nested ``state_dict.``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            names = list(self._file.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({exc}); the file is truncated or corrupt — download it again"
            ) from exc
        self._list(names)

    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` strings (empty when it has none)."""
        return dict(self._file.metadata() or {})

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._index:
            raise KeyError(key)
        tensor: Tensor = self._file.get_tensor(key)
        return tensor

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape from the header, without reading data."""
        return tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """Dtype from the header, without reading data."""
        name = self._file.get_slice(key).get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return _SAFETENSORS_DTYPES[name]


class TorchPickleFile(TensorDict):
    """A ``.ckpt``/``.pt`` file read with ``torch.load(weights_only=True)``: tensors only, never code."""

    def __init__(self, path: Path) -> None:
        self.path = path
        warnings.warn(
            f"{path.name}: pickle checkpoints are read with weights_only=True (no code is run); "
            "prefer .safetensors, which loads faster and without a copy",
            UserWarning,
            stacklevel=3,
        )
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: cannot be read as a tensors-only torch checkpoint ({type(exc).__name__}: {exc}); "
                "it may be truncated, or hold pickled objects latentrt refuses to unpickle — convert it to "
                ".safetensors"
            ) from exc
        super().__init__(_tensor_dict(loaded, path), str(path))


def _tensor_dict(loaded: object, path: Path) -> dict[str, Tensor]:
    """The tensors of a loaded pickle, looking inside a nested ``state_dict`` like LDM files do."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors, got {type(loaded).__name__}")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


class PrefixView(_ListedSource):
    """The tensors of ``source`` whose names start with ``prefix``, prefix stripped; lazy."""

    def __init__(self, source: TensorSource, prefix: str) -> None:
        self.source = source
        self.prefix = prefix
        self.description = f"{source.description} [{prefix}*]"
        self._list(k[len(prefix) :] for k in source if k.startswith(prefix))

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._index:
            raise KeyError(key)
        return self.source[self.prefix + key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of the underlying tensor, without reading data."""
        return self.source.shape(self.prefix + key)

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of the underlying tensor, without reading data."""
        return self.source.dtype(self.prefix + key)

    def name_in_source(self, key: str) -> str:
        """The file's name for ``key`` when the source renamed it (the prefix alone is no renaming)."""
        original = self.source.name_in_source(self.prefix + key)
        return key if original == self.prefix + key else original


class TensorFile(TensorSource):
    """Several files seen as one mapping (a sharded diffusers component)."""

    def __init__(self, parts: Iterable[TensorSource], description: str) -> None:
        self.description = description
        self._owner: dict[str, TensorSource] = {}
        for part in parts:
            for key in part:
                if key in self._owner:
                    raise CheckpointError(f"{description}: tensor {key!r} appears in two shards")
                self._owner[key] = part

    def __getitem__(self, key: str) -> Tensor:
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, key: object) -> bool:
        return key in self._owner

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape from the owning shard, without reading data."""
        return self._owner[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        """Dtype from the owning shard, without reading data."""
        return self._owner[key].dtype(key)


def open_tensors(path: str | Path) -> TensorSource:
    """Open a ``.safetensors`` (memory-mapped) or ``.ckpt``/``.pt`` (tensors only) file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a diffusers folder as the model, not as a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        file = SafetensorsFile(path)
        nested = len(file) > 0 and all(name.startswith("state_dict.") for name in file)
        return file.with_prefix("state_dict.") if nested else file
    if suffix in PICKLE_SUFFIXES:
        return TorchPickleFile(path)
    raise CheckpointError(f"{path}: unknown file type {suffix or '(none)'}; expected .safetensors or .ckpt")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a CheckpointError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def diffusers_component(folder: str | Path, component: str) -> tuple[TensorSource, dict[str, Any]]:
    """The weights and ``config.json`` of ``folder/component`` in a diffusers folder.

    Reads ``diffusion_pytorch_model.safetensors`` or ``model.safetensors``, sharded ones
    through their ``*.safetensors.index.json``, and ``.bin`` files tensors-only.
    """
    directory = Path(folder) / component
    if not directory.is_dir():
        raise CheckpointError(f"{Path(folder)}: diffusers folder has no {component}/ component")
    config = read_json(directory / "config.json")
    for stem in _WEIGHT_NAMES:
        single = directory / f"{stem}.safetensors"
        if single.exists():
            return SafetensorsFile(single), config
        index = directory / f"{stem}.safetensors.index.json"
        if index.exists():
            return _sharded(index), config
    for stem in _WEIGHT_NAMES:
        if (directory / f"{stem}.bin").exists():
            return TorchPickleFile(directory / f"{stem}.bin"), config
    raise CheckpointError(
        f"{directory}: no weights (expected diffusion_pytorch_model.safetensors or model.safetensors)"
    )


def _sharded(index_path: Path) -> TensorFile:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: has no weight_map")
    shards = sorted(set(weight_map.values()))
    return TensorFile([SafetensorsFile(index_path.parent / shard) for shard in shards], str(index_path.parent))


def shape_of(weights: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape, from the file header when ``weights`` is a :class:`TensorSource`."""
    return weights.shape(key) if isinstance(weights, TensorSource) else tuple(weights[key].shape)


def dtype_of(weights: Mapping[str, Tensor], key: str) -> torch.dtype:
    """A tensor's dtype, from the file header when ``weights`` is a :class:`TensorSource`."""
    return weights.dtype(key) if isinstance(weights, TensorSource) else weights[key].dtype


def describe(weights: Mapping[str, Tensor]) -> str:
    """Where ``weights`` come from, for error messages."""
    return weights.description if isinstance(weights, TensorSource) else "state dict"


def check_tensors(
    source: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    *,
    allow_unexpected: Iterable[str] = (),
    limit: int = 5,
    integer: Iterable[str] = (),
) -> None:
    """Refuse ``source`` unless it holds exactly the ``expected`` names and shapes.

    The message names the file, the component, and the first ``limit`` missing,
    unexpected and misshapen tensors with what was expected. ``allow_unexpected`` lists
    name prefixes that may be present and are ignored (EMA copies, ``model_ema.``, ...).
    Every tensor must be floating-point except those named in ``integer``, which must not be.
    """
    allowed = tuple(allow_unexpected)
    label = _labeller(source)
    missing = [label(k) for k in expected if k not in source]
    unexpected = [label(k) for k in source if k not in expected and not k.startswith(allowed)]
    misshapen = [
        f"{label(k)} {shape_of(source, k)} (expected {tuple(expected[k])})"
        for k in expected
        if k in source and shape_of(source, k) != tuple(expected[k])
    ]
    problems = []
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            problems.append(f"{len(items)} {kind}: {', '.join(items[:limit])}{more}")
    if problems:
        raise CheckpointError(f"{describe(source)}: not a valid {what}: {'; '.join(problems)}")
    integers = set(integer)
    for key in expected:
        wanted = "an integer" if key in integers else "a float"
        if dtype_of(source, key).is_floating_point == (key in integers):
            raise CheckpointError(f"{describe(source)}: {what} tensor {key!r} is {dtype_of(source, key)}, not {wanted}")


def _labeller(source: Mapping[str, Tensor]) -> Callable[[str], str]:
    """``key``, followed by the file's own name for it in brackets when that differs."""
    if not isinstance(source, TensorSource):
        return lambda key: key

    def label(key: str) -> str:
        original = source.name_in_source(key)
        return key if original == key else f"{key} [{original}]"

    return label


def _own_storage(tensor: Tensor) -> Tensor:
    """``tensor`` contiguous and in storage of its own: a slice (q of OpenCLIP's stacked
    ``in_proj_weight``) must not keep the whole stack alive inside a model."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def load_module(
    build: Callable[[], nn.Module],
    weights: Mapping[str, Tensor],
    what: str,
    *,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = torch.float32,
    allow_unexpected: Iterable[str] = (),
) -> nn.Module:
    """Build a module on the meta device and give it ``weights``, strictly and without a second copy.

    Names and shapes are checked first (:func:`check_tensors`), so nothing loads
    partially; each tensor is then read once, in the source's order, and assigned (a
    memory-mapped tensor that needs no dtype or device change is used as is; one that is
    converted has its file pages dropped right after, so a conversion holds one tensor's
    source at a time rather than the whole file).
    ``dtype=None`` / ``device=None`` keep the stored dtypes / devices. Inside
    :func:`latentrt.core.layerwise.storing`, layer weights are converted to the storage dtype
    instead and upcast layer by layer as the module runs.
    """
    with torch.device("meta"):
        module = build()
    own = module.state_dict()
    expected = {name: tuple(t.shape) for name, t in own.items()}
    integer = [name for name, t in own.items() if not t.is_floating_point()]
    check_tensors(weights, expected, what, allow_unexpected=allow_unexpected, integer=integer)
    stored = storage_dtype(dtype)
    reduced = stored_parameter_names(module) if stored is not None else set()
    mappings = file_mappings()
    state = {}
    for name in (name for name in weights if name in expected):
        source = weights[name]
        state[name] = _own_storage(_convert(source, device, stored if name in reduced else dtype))
        if state[name].data_ptr() != source.data_ptr():  # converted: the file's pages are not needed
            release_file_pages(source, mappings)
    module.load_state_dict(state, strict=True, assign=True)
    if stored is not None and dtype is not None:
        install_layerwise_casting(module, dtype)
    file_back_loaded(module)
    return module.eval().requires_grad_(False)


def _convert(tensor: Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
    """``tensor`` on ``device``; floating-point tensors also in ``dtype`` (integer buffers keep theirs)."""
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256."""
    return file_sha256(path)[:10]


@dataclass
class Checkpoint:
    """A model as the user points at it: one tensor file, or a diffusers folder."""

    path: Path
    tensors: TensorSource | None = None
    folder: Path | None = None

    @property
    def name(self) -> str:
        """What A1111 shows as the model name: the file stem, or the folder name."""
        return self.path.stem if self.tensors is not None else self.path.name

    def model_index(self) -> dict[str, Any]:
        """A diffusers folder's ``model_index.json`` (empty for single files)."""
        return read_json(self.folder / "model_index.json") if self.folder is not None else {}

    def component(self, name: str) -> tuple[TensorSource, dict[str, Any]]:
        """Weights and config of a diffusers component (``unet``, ``vae``, ``text_encoder``, ...)."""
        if self.folder is None:
            raise CheckpointError(f"{self.path}: a single-file checkpoint has no {name}/ component")
        return diffusers_component(self.folder, name)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a single-file checkpoint (``.safetensors``/``.ckpt``) or a diffusers folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise CheckpointError(
                f"{path}: a folder without model_index.json is not a diffusers model; point at the "
                "folder that holds model_index.json, or at a .safetensors file"
            )
        return Checkpoint(path=path, folder=path)
    return Checkpoint(path=path, tensors=open_tensors(path))
