"""The models a service can run, loaded on demand and evicted least-recently-used.

Names follow A1111 (``/sdapi/v1/sd-models``): ``model_name`` is the file stem,
``title`` is ``"<file name> [<short hash>]"``, ``hash`` the first 10 hex digits of the
file's SHA-256; any of them (or the path) selects a model.
"""

from __future__ import annotations

import difflib
import functools
import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from latentrt.core.checkpoint import file_sha256
from latentrt.core.errors import InvalidRequest
from latentrt.core.pipeline import Pipeline
from latentrt.service.batching import BatchStats, StepBatcher, batched_pipeline
from latentrt.service.errors import InvalidField

__all__ = ["LoadedModel", "ModelEntry", "ModelPool", "model_bytes", "model_entries"]

logger = logging.getLogger(__name__)

ModelSource = Pipeline | str | Path


@dataclass(eq=False)
class ModelEntry:
    """A model the service can run: a checkpoint (loaded on demand) or a caller's pipeline (kept loaded)."""

    name: str
    path: Path | None = None
    pipeline: Pipeline | None = None

    @functools.cached_property
    def sha256(self) -> str | None:
        """The checkpoint file's SHA-256 (None for folders and given pipelines); computed once."""
        if self.path is None or not self.path.is_file():
            return None
        return file_sha256(self.path)

    @property
    def short_hash(self) -> str | None:
        """A1111's short hash: 10 hex digits of the SHA-256."""
        if self.sha256 is not None:
            return self.sha256[:10]
        return self.pipeline.model.model_hash() if self.pipeline is not None else None

    @property
    def filename(self) -> str:
        """The checkpoint path, or the name of a given pipeline."""
        return str(self.path) if self.path is not None else self.name

    @property
    def title(self) -> str:
        """A1111's title: ``"file.safetensors [hash]"``."""
        base = self.path.name if self.path is not None else self.name
        return f"{base} [{self.short_hash}]" if self.short_hash else base

    def matches(self, text: str) -> bool:
        """Whether ``text`` names this model (name, file name, path, short hash or title)."""
        text = text.strip()
        base, _, _ = text.partition(" [")
        names = {self.name, self.filename}
        if self.path is not None:
            names |= {self.path.name, self.path.stem}
        return text in names or base in names or (len(text) == 10 and text == self.short_hash)


@dataclass(eq=False)
class LoadedModel:
    """A loaded model: the pipeline requests run through and the batcher that stacks their steps."""

    entry: ModelEntry
    pipeline: Pipeline
    batcher: StepBatcher
    nbytes: int
    users: int = 0


def model_bytes(pipeline: Pipeline) -> int:
    """Bytes held by the parameters and buffers of a pipeline's modules (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for module in _modules([pipeline.model, pipeline.refiner], depth=4):
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _modules(objects: Iterable[object], depth: int) -> Iterator[nn.Module]:
    for obj in objects:
        if isinstance(obj, nn.Module):
            yield obj
        elif depth > 0 and obj is not None and hasattr(obj, "__dict__"):
            yield from _modules(vars(obj).values(), depth - 1)


@dataclass(eq=False)
class ModelPool:
    """Models by name; at most ``max_loaded`` (and ``max_bytes``) loaded, least recently used evicted first.

    A model in use is never evicted; caller-given pipelines are never evicted. ``load``
    turns a checkpoint path into a pipeline; ``make_batcher`` makes each loaded model's batcher.
    """

    entries: list[ModelEntry]
    load: Callable[[Path], Pipeline]
    make_batcher: Callable[[], StepBatcher]
    max_loaded: int = 2
    max_bytes: int | None = None
    default: ModelEntry = field(init=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise InvalidRequest("a service needs at least one model")
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise InvalidRequest(f"model names must be unique, got {names}; name them with a mapping")
        self.default = self.entries[0]
        self._lock = threading.Lock()
        self._load_locks = {e.name: threading.Lock() for e in self.entries}
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._retired = BatchStats()
        for entry in self.entries:  # given pipelines are in memory already
            if entry.pipeline is not None:
                batcher = self.make_batcher()
                pipeline = batched_pipeline(entry.pipeline, batcher)
                self._loaded[entry.name] = LoadedModel(entry, pipeline, batcher, model_bytes(entry.pipeline))

    def find(self, text: str) -> ModelEntry:
        """The model ``text`` names, or :class:`InvalidField` listing the close and the valid names."""
        for entry in self.entries:
            if isinstance(text, str) and entry.matches(text):
                return entry
        names = [e.name for e in self.entries]
        close = difflib.get_close_matches(str(text).partition(" [")[0], names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise InvalidField("model", f"unknown model {text!r}; {hint}available: {', '.join(names)}")

    def loaded_names(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def stats(self) -> BatchStats:
        """Batching counters summed over every model loaded so far."""
        with self._lock:
            parts = [self._retired, *(m.batcher.snapshot() for m in self._loaded.values())]
        return functools.reduce(BatchStats.plus, parts, BatchStats())

    @contextmanager
    def lease(self, entry: ModelEntry) -> Iterator[LoadedModel]:
        """The loaded model of ``entry`` (loading it if needed), kept from eviction during the block."""
        loaded = self._acquire(entry)
        try:
            yield loaded
        finally:
            with self._lock:
                loaded.users -= 1
                self._evict()

    def _acquire(self, entry: ModelEntry) -> LoadedModel:
        with self._load_locks[entry.name]:
            with self._lock:
                loaded = self._loaded.get(entry.name)
                if loaded is not None:
                    loaded.users += 1
                    self._loaded.move_to_end(entry.name)
                    return loaded
            assert entry.path is not None, "given pipelines are always loaded"
            logger.info("loading model %s from %s", entry.name, entry.path)
            pipeline = self.load(entry.path)
            batcher = self.make_batcher()
            loaded = LoadedModel(entry, batched_pipeline(pipeline, batcher), batcher, model_bytes(pipeline), users=1)
            with self._lock:
                self._loaded[entry.name] = loaded
                self._evict()
            return loaded

    def _evict(self) -> None:
        """Drop idle, reloadable models, least recently used first, until within the limits (under the lock)."""
        while self._over_limits():
            idle = [m for m in self._loaded.values() if m.users == 0 and m.entry.pipeline is None]
            if not idle:
                return
            victim = idle[0]
            del self._loaded[victim.entry.name]
            self._retired = self._retired.plus(victim.batcher.snapshot())
            logger.info("unloaded model %s (least recently used)", victim.entry.name)
            gc.collect()

    def _over_limits(self) -> bool:
        total = sum(m.nbytes for m in self._loaded.values())
        return len(self._loaded) > self.max_loaded or (self.max_bytes is not None and total > self.max_bytes)


def model_entries(
    sources: Mapping[str, ModelSource] | Sequence[ModelSource], resolve: Callable[[str | Path], Path]
) -> list[ModelEntry]:
    """Entries from ``{name: pipeline or path}`` or a list of paths (named by file stem).

    ``resolve`` turns a path or a built-in model's name (``"demo"``) into a checkpoint path.
    """
    named: Iterable[tuple[str | None, ModelSource]] = (
        sources.items() if isinstance(sources, Mapping) else [(None, s) for s in sources]
    )
    entries = []
    for name, source in named:
        if isinstance(source, Pipeline):
            entries.append(ModelEntry(name or source.model.name, pipeline=source))
            continue
        path = resolve(source)
        entries.append(ModelEntry(name or (path.stem if path.is_file() else path.name), path=path))
    return entries
