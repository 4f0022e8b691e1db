"""The engine cache (DESIGN.md section 4): one folder per compiled component, checked before every use.

Layout: ``<engines>/<component>-<precision>-<digest>/`` holding the exporter's files and its
``manifest.json``, where ``<engines>`` is the folder given (``--engines DIR``), else
``$LATENTRT_CACHE/engines``, else ``~/.cache/latentrt/engines``, and ``<digest>`` the first 16 hex
digits of the key's SHA-256.

The key (:class:`EngineKey`) holds the content hash of the weights the component was read from,
the component, the exporter and its version, the precision, the shape range, the runtime and its
version, and the device (execution providers, GPU model and compute capability). An entry is
used only when its manifest carries exactly that key, its validation passed, and every file it
lists has the recorded size and SHA-256; anything else (missing, truncated, edited, another key,
an older manifest format) is rebuilt, never trusted. File hashes are remembered like checkpoint
hashes (below), so an unchanged multi-GB engine is not read twice to be checked.

Content hashes are the SHA-256 of a file's bytes (A1111's model hash is the first 10 hex digits
of the same digest); a diffusers folder hashes its files' relative paths and hashes. Hashing a
4 GB checkpoint takes seconds, so hashes are remembered in ``<cache>/hashes.json`` by path, size
and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from latentrt.core.checkpoint import file_sha256
from latentrt.core.errors import ExportError
from latentrt.core.protocols import Artifact, CompileRequest, Exporter, Runtime
from latentrt.exporters import read_artifact

__all__ = [
    "EngineCache",
    "EngineKey",
    "cache_root",
    "cached_artifact",
    "content_sha256",
    "engines_dir",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "LATENTRT_CACHE"


def cache_root() -> Path:
    """``$LATENTRT_CACHE``, else ``~/.cache/latentrt``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "latentrt"


def engines_dir(engines: str | Path | None = None) -> Path:
    """Where engines live: ``engines`` when given, else ``<cache root>/engines``."""
    return Path(engines).expanduser() if engines is not None else cache_root() / "engines"


@dataclass(frozen=True)
class EngineKey:
    """Everything a compiled component depends on; any change makes a different cache entry."""

    checkpoint: str
    component: str
    exporter: str
    exporter_version: str
    precision: str
    shape_range: tuple[tuple[str, int, int, int], ...]
    runtime: str
    runtime_version: str
    device: str

    def fields(self) -> dict[str, Any]:
        """The key as JSON data (what the manifest stores under ``metadata.cache_key``)."""
        data = asdict(self)
        data["shape_range"] = [list(entry) for entry in self.shape_range]
        return data

    @property
    def digest(self) -> str:
        """SHA-256 of the key's canonical JSON."""
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        """``<component>-<precision>-<digest[:16]>``."""
        return f"{self.component}-{self.precision}-{self.digest[:16]}"


def shape_range_key(shape_range: Mapping[str, tuple[int, int, int]]) -> tuple[tuple[str, int, int, int], ...]:
    """A spec's shape range as a sorted, hashable tuple."""
    return tuple((name, *bounds) for name, bounds in sorted(shape_range.items()))


def content_sha256(path: str | Path, memo: Path | None = None) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative paths and their hashes), remembered
    in ``memo`` (default ``<cache root>/hashes.json``) by path, size and modification time."""
    path = Path(path).expanduser().resolve()
    memo = memo or cache_root() / "hashes.json"
    remembered = _read_memo(memo)
    if path.is_file():
        return _memoized(path, remembered, memo)
    if not path.is_dir():
        raise ExportError(f"{path}: cannot hash the weights for the engine cache: no such file or folder")
    digest = hashlib.sha256()
    files = (
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    for file in sorted(files):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_memoized(file, remembered, memo)}\n".encode())
    return digest.hexdigest()


def _read_memo(memo: Path) -> dict[str, Any]:
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _memoized(path: Path, remembered: dict[str, Any], memo: Path) -> str:
    """The remembered hash of ``path`` if its size and mtime are unchanged, else a fresh one (saved)."""
    stat = path.stat()
    entry = remembered.get(str(path))
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    sha = file_sha256(path)
    remembered[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    for gone in [name for name in remembered if not Path(name).exists()]:  # forget deleted files
        del remembered[gone]
    _write_json(memo, remembered)
    return sha


def _write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(temp, path)
    except OSError as exc:  # an unwritable memo only costs a rehash next time
        logger.warning("could not remember checkpoint hashes in %s: %s", path, exc)


class EngineCache:
    """Engine folders under :func:`engines_dir`, checked against their key before every use."""

    def __init__(self, engines: str | Path | None = None) -> None:
        self.directory = engines_dir(engines)

    def entry(self, key: EngineKey) -> Path:
        """The folder for ``key`` (it may not exist yet)."""
        return self.directory / key.folder_name

    def check(self, key: EngineKey) -> tuple[Artifact | None, str]:
        """The entry's artifact when it is intact and made for ``key``; else None and why not."""
        folder = self.entry(key)
        if not folder.is_dir():
            return None, "not built yet"
        try:
            artifact = read_artifact(folder)
        except ExportError as exc:
            return None, str(exc)
        manifest = artifact.manifest
        if manifest.get("metadata", {}).get("cache_key") != key.fields():
            return None, "its manifest was made for another key"
        if manifest.get("status") != "ok":
            return None, f"its validation failed: {manifest.get('failure')}"
        for name, record in manifest["files"].items():
            problem = _file_problem(folder / name, record)
            if problem:
                return None, f"{name} {problem}"
        return artifact, "ok"

    def get_or_build(self, key: EngineKey, build: Callable[[Path], Artifact]) -> Artifact:
        """The intact entry for ``key``, or ``build(folder)``'s artifact (checked again before use)."""
        artifact, reason = self.check(key)
        if artifact is not None:
            logger.info("engine cache hit: %s", artifact.directory)
            return artifact
        folder = self.entry(key)
        if folder.exists():
            logger.warning("engine cache entry %s is unusable (%s); rebuilding it", folder, reason)
        build(folder)
        artifact, reason = self.check(key)
        if artifact is None:
            raise ExportError(f"the engine just built in {folder} does not check out ({reason})")
        return artifact


def _file_problem(path: Path, record: Any) -> str | None:
    """Why ``path`` does not match its manifest record (size and SHA-256), or None."""
    if not isinstance(record, dict) or "bytes" not in record or "sha256" not in record:
        return "has no size and hash in the manifest"
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != record["bytes"]:
        return f"has {path.stat().st_size} bytes, the manifest says {record['bytes']} (truncated or replaced)"
    if content_sha256(path) != record["sha256"]:  # rehashed whenever the file's size or time changed
        return "does not match its SHA-256 in the manifest (corrupted or edited)"
    return None


def cached_artifact(exporter: Exporter, runtime: Runtime, request: CompileRequest, device: str) -> Artifact:
    """The engine-cache artifact for ``request`` made by ``exporter`` for ``runtime`` on ``device``,
    exported on first use. ``device`` describes what the artifact is tied to (providers, GPU)."""
    component = request.component
    checkpoint = content_sha256(request.weights)
    key = EngineKey(
        checkpoint=checkpoint,
        component=component.name,
        exporter=exporter.name,
        exporter_version=exporter.version(),
        precision=request.precision,
        shape_range=shape_range_key(component.spec.shape_range),
        runtime=runtime.name,
        runtime_version=runtime.version(),
        device=device,
    )
    metadata = {"cache_key": key.fields(), "checkpoint_sha256": checkpoint, "weights": str(request.weights)}

    def build(folder: Path) -> Artifact:
        logger.info("exporting %s to %s (first use)", component.name, folder)
        return exporter.export(component.module, component.spec, folder, request.precision, metadata=metadata)

    return EngineCache(request.engines).get_or_build(key, build)
