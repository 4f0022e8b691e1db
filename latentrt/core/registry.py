"""The plugin manager and the :class:`Registry` it fills (DESIGN.md section 3).

The plugin manager is built in a function, never at import time. Built-in plugins are
registered exactly like third-party ones (pytest's ``default_plugins`` pattern), then
the ``latentrt`` entry points are loaded unless ``LATENTRT_DISABLE_PLUGIN_AUTOLOAD=1``.
``LATENTRT_BLOCK_PLUGINS=a,b`` blocks plugins by name, built-ins included. Each
plugin's ``latentrt_register`` hook receives the registry, which records which plugin
added each name.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import operator
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar

import pluggy
from torch import Tensor

from latentrt.core import hookspecs
from latentrt.core.errors import InvalidRequest, PluginError
from latentrt.core.protocols import Conditioning, Denoiser, ModelSampling, NoiseSource, SamplerCallback
from latentrt.core.sampling import check_options, check_sigmas, sampler_options, sampler_signature_problem

__all__ = [
    "BUILTIN_PLUGINS",
    "ComponentSpec",
    "NoiseKind",
    "Registry",
    "SamplerSpec",
    "SchedulerSpec",
    "build_registry",
    "registry",
    "reset_registry",
]

BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("latentrt.samplers", "latentrt.plugins.samplers"),
    ("latentrt.schedules", "latentrt.plugins.schedules"),
    ("latentrt.stable_diffusion", "latentrt.plugins.stable_diffusion"),
    ("latentrt.demo", "latentrt.plugins.demo"),
    ("latentrt.runtimes", "latentrt.runtimes"),
)
"""(plugin name, module) of the plugins that ship with latentrt."""

NoiseKind = Literal["none", "gaussian", "brownian"]
"""What noise a sampler consumes: none, independent Gaussian, or Brownian-tree increments."""

SamplerFn = Callable[..., Tensor]
SchedulerFn = Callable[[int, ModelSampling], Tensor]


def _first_doc_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function and how tools and users name it.

    ``noise`` says which noise source the sampler consumes when its options make it draw
    noise (the pipeline always builds that source; euler uses it only with ``s_churn > 0``);
    ``discard_penultimate_sigma`` marks samplers that ComfyUI and A1111 run on a
    schedule with its second-to-last sigma dropped (dpm_2, dpm_2_ancestral, uni_pc).
    """

    name: str
    fn: SamplerFn
    label: str
    aliases: tuple[str, ...]
    plugin: str
    noise: NoiseKind = "none"
    discard_penultimate_sigma: bool = False
    description: str = ""

    @property
    def options(self) -> dict[str, Any]:
        """Options the sampler takes beyond the contract, with their defaults."""
        return sampler_options(self.fn)

    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        *,
        cond: Conditioning | None = None,
        noise: NoiseSource | None = None,
        callback: SamplerCallback | None = None,
        **options: Any,
    ) -> Tensor:
        """Check sigmas and options, then run the sampler."""
        check_sigmas(sigmas)
        check_options(self.fn, self.name, options)
        return self.fn(denoiser, x, sigmas, cond=cond, noise=noise, callback=callback, **options)


@dataclass(frozen=True)
class SchedulerSpec:
    """A registered sigma schedule."""

    name: str
    fn: SchedulerFn
    label: str
    aliases: tuple[str, ...]
    plugin: str
    description: str = ""

    def sigmas(self, steps: int, model_sampling: ModelSampling) -> Tensor:
        """``steps + 1`` decreasing sigmas ending in 0, checked."""
        try:
            count = operator.index(steps)  # ints, numpy and torch integers; not floats or bools
        except TypeError:
            count = 0
        if isinstance(steps, bool) or count < 1:
            raise InvalidRequest(f"steps must be an integer >= 1, got {steps!r}")
        sigmas = self.fn(count, model_sampling)
        check_sigmas(sigmas)
        return sigmas


@dataclass(frozen=True)
class ComponentSpec:
    """A registered model family, exporter or runtime: a named factory."""

    name: str
    factory: Callable[..., Any]
    label: str
    aliases: tuple[str, ...]
    plugin: str
    description: str = ""


SpecT = TypeVar("SpecT", SamplerSpec, SchedulerSpec, ComponentSpec)


@dataclass
class _Table(Generic[SpecT]):
    """Specs of one kind, by canonical name, with a case-insensitive lookup of every spelling."""

    kind: str
    specs: dict[str, SpecT] = field(default_factory=dict)
    spellings: dict[str, str] = field(default_factory=dict)

    def add(self, spec: SpecT) -> None:
        for spelling in (spec.name, spec.label, *spec.aliases):
            owner = self.spellings.get(spelling.casefold())
            if owner is not None and owner != spec.name:
                other = self.specs[owner]
                raise PluginError(
                    f"{self.kind} name {spelling!r} of plugin {spec.plugin!r} is already taken by "
                    f"{self.kind} {other.name!r} of plugin {other.plugin!r}; rename one or block a plugin "
                    "with LATENTRT_BLOCK_PLUGINS"
                )
        if spec.name in self.specs:
            raise PluginError(
                f"{self.kind} {spec.name!r} registered twice, by plugin {self.specs[spec.name].plugin!r} "
                f"and plugin {spec.plugin!r}"
            )
        self.specs[spec.name] = spec
        for spelling in (spec.name, spec.label, *spec.aliases):
            self.spellings[spelling.casefold()] = spec.name

    def find(self, name: str) -> SpecT | None:
        canonical = self.spellings.get(name.strip().casefold()) if isinstance(name, str) else None
        return None if canonical is None else self.specs[canonical]

    def get(self, name: str) -> SpecT:
        spec = self.find(name)
        if spec is None:
            raise PluginError(self.unknown_message(name))
        return spec

    def unknown_message(self, name: object) -> str:
        close = difflib.get_close_matches(str(name).casefold(), list(self.spellings), n=12, cutoff=0.5)
        suggestions = list(dict.fromkeys(self.spellings[c] for c in close))[:4]
        hint = f"did you mean {', '.join(repr(s) for s in suggestions)}? " if suggestions else ""
        valid = ", ".join(sorted(self.specs)) or "none registered"
        return f"unknown {self.kind} {name!r}; {hint}valid names: {valid}"


class Registry:
    """Everything the loaded plugins registered, by kind and name.

    Hooks receive a registry and call its ``add_*`` methods; users read the
    ``samplers``/``schedulers``/... mappings and resolve names with :meth:`sampler`,
    :meth:`scheduler` and friends, which accept canonical names, A1111 labels and
    aliases (case-insensitive) and answer unknown names with the closest valid ones.
    """

    def __init__(self) -> None:
        self._samplers: _Table[SamplerSpec] = _Table("sampler")
        self._schedulers: _Table[SchedulerSpec] = _Table("scheduler")
        self._components: dict[str, _Table[ComponentSpec]] = {
            kind: _Table(kind) for kind in ("model family", "exporter", "runtime")
        }
        self._plugin = "<direct>"
        self.plugins: list[str] = []

    @contextmanager
    def registering(self, plugin: str) -> Iterator[Registry]:
        """Attribute everything added inside the block to ``plugin``."""
        previous, self._plugin = self._plugin, plugin
        try:
            yield self
        finally:
            self._plugin = previous
        if plugin not in self.plugins:
            self.plugins.append(plugin)

    # -- registration -------------------------------------------------------------

    def add_sampler(
        self,
        name: str,
        fn: SamplerFn,
        *,
        label: str | None = None,
        aliases: Iterable[str] = (),
        noise: NoiseKind = "none",
        discard_penultimate_sigma: bool = False,
        description: str | None = None,
    ) -> SamplerSpec:
        """Register sampler ``fn`` under ``name`` (ComfyUI spelling), ``label`` (A1111) and ``aliases``."""
        if noise not in ("none", "gaussian", "brownian"):
            raise PluginError(
                f"plugin {self._plugin!r}: sampler {name!r}: noise must be 'none', 'gaussian' or 'brownian', "
                f"got {noise!r}"
            )
        problem = sampler_signature_problem(self._check_callable(fn, name))
        if problem is not None:
            raise PluginError(f"plugin {self._plugin!r}: sampler {name!r} breaks the sampler contract: {problem}")
        spec = SamplerSpec(
            name=self._check_name(name, "sampler"),
            fn=fn,
            label=label or name,
            aliases=tuple(aliases),
            plugin=self._plugin,
            noise=noise,
            discard_penultimate_sigma=discard_penultimate_sigma,
            description=description or _first_doc_line(fn),
        )
        self._samplers.add(spec)
        return spec

    def add_scheduler(
        self,
        name: str,
        fn: SchedulerFn,
        *,
        label: str | None = None,
        aliases: Iterable[str] = (),
        description: str | None = None,
    ) -> SchedulerSpec:
        """Register sigma schedule ``fn(steps, model_sampling) -> sigmas`` under ``name``."""
        spec = SchedulerSpec(
            name=self._check_name(name, "scheduler"),
            fn=self._check_callable(fn, name),
            label=label or name,
            aliases=tuple(aliases),
            plugin=self._plugin,
            description=description or _first_doc_line(fn),
        )
        self._schedulers.add(spec)
        return spec

    def _add_component(self, kind: str, name: str, factory: Callable[..., Any], **kwargs: Any) -> ComponentSpec:
        spec = ComponentSpec(
            name=self._check_name(name, kind),
            factory=self._check_callable(factory, name),
            label=kwargs.get("label") or name,
            aliases=tuple(kwargs.get("aliases", ())),
            plugin=self._plugin,
            description=kwargs.get("description") or _first_doc_line(factory),
        )
        self._components[kind].add(spec)
        return spec

    def add_model_family(self, name: str, factory: Callable[..., Any], **kwargs: Any) -> ComponentSpec:
        """Register a model family (``label``, ``aliases``, ``description`` keywords)."""
        return self._add_component("model family", name, factory, **kwargs)

    def add_exporter(self, name: str, factory: Callable[..., Any], **kwargs: Any) -> ComponentSpec:
        """Register an exporter factory (``label``, ``aliases``, ``description`` keywords)."""
        return self._add_component("exporter", name, factory, **kwargs)

    def add_runtime(self, name: str, factory: Callable[..., Any], **kwargs: Any) -> ComponentSpec:
        """Register a runtime factory (``label``, ``aliases``, ``description`` keywords)."""
        return self._add_component("runtime", name, factory, **kwargs)

    def _check_name(self, name: str, kind: str) -> str:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise PluginError(
                f"plugin {self._plugin!r}: a {kind} name must be a non-empty string without surrounding "
                f"spaces, got {name!r}"
            )
        return name

    def _check_callable(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        if not callable(fn):
            raise PluginError(
                f"plugin {self._plugin!r}: {name!r} must be registered with a callable, got {type(fn).__name__}"
            )
        return fn

    # -- reading --------------------------------------------------------------------

    @property
    def samplers(self) -> Mapping[str, SamplerSpec]:
        """Samplers by canonical name, in registration order."""
        return MappingProxyType(self._samplers.specs)

    @property
    def schedulers(self) -> Mapping[str, SchedulerSpec]:
        """Sigma schedules by canonical name, in registration order."""
        return MappingProxyType(self._schedulers.specs)

    @property
    def model_families(self) -> Mapping[str, ComponentSpec]:
        """Model families by canonical name."""
        return MappingProxyType(self._components["model family"].specs)

    @property
    def exporters(self) -> Mapping[str, ComponentSpec]:
        """Exporters by canonical name."""
        return MappingProxyType(self._components["exporter"].specs)

    @property
    def runtimes(self) -> Mapping[str, ComponentSpec]:
        """Runtimes by canonical name."""
        return MappingProxyType(self._components["runtime"].specs)

    def sampler(self, name: str) -> SamplerSpec:
        """The sampler called ``name``, ``label`` or alias ("dpmpp_2m", "DPM++ 2M", "k_dpmpp_2m")."""
        return self._samplers.get(name)

    def scheduler(self, name: str) -> SchedulerSpec:
        """The schedule called ``name``, label or alias ("karras", "Karras")."""
        return self._schedulers.get(name)

    def model_family(self, name: str) -> ComponentSpec:
        """The model family called ``name``."""
        return self._components["model family"].get(name)

    def find_model_family(self, name: str) -> ComponentSpec | None:
        """The model family called ``name`` (or an alias), or None: a lookup that may miss."""
        return self._components["model family"].find(name)

    def exporter(self, name: str) -> ComponentSpec:
        """The exporter called ``name``."""
        return self._components["exporter"].get(name)

    def runtime(self, name: str) -> ComponentSpec:
        """The runtime called ``name``."""
        return self._components["runtime"].get(name)

    def sampler_and_scheduler(self, label: str) -> tuple[SamplerSpec, SchedulerSpec | None]:
        """Resolve old A1111 labels that name a schedule too ("DPM++ 2M Karras").

        Returns the sampler and the schedule the label implies, or ``None`` for the
        schedule when the label names a sampler alone.
        """
        spec = self._samplers.find(label)
        if spec is not None:
            return spec, None
        if not isinstance(label, str):
            raise PluginError(f"a sampler label must be a string, got {type(label).__name__}")
        head, _, tail = label.strip().rpartition(" ")
        sampler, schedule = self._samplers.find(head), self._schedulers.find(tail)
        if sampler is None or schedule is None:
            raise PluginError(self._samplers.unknown_message(label))
        return sampler, schedule


# -- plugin loading -------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _blocked_from_env() -> set[str]:
    return {n.strip() for n in os.environ.get("LATENTRT_BLOCK_PLUGINS", "").split(",") if n.strip()}


def make_plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager that knows latentrt's hook specifications."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def _register_plugin(manager: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        manager.register(plugin, name=name)
    except ValueError as exc:
        raise PluginError(f"plugin {name!r} could not be registered: {exc}") from exc


def _load_builtins(manager: pluggy.PluginManager, blocked: set[str]) -> None:
    for name, module_name in BUILTIN_PLUGINS:
        if name in blocked:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(
                f"built-in plugin {name!r} ({module_name}) failed to import: {type(exc).__name__}: {exc}; "
                "reinstall latentrt"
            ) from exc
        _register_plugin(manager, module, name)


def _load_entry_points(manager: pluggy.PluginManager, blocked: set[str]) -> None:
    """Import every ``latentrt`` entry point; an import failure or a name clash is a PluginError."""
    owners = {name: "latentrt itself (built-in)" for name, _ in BUILTIN_PLUGINS}
    for entry_point in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
        if entry_point.name in blocked:
            continue
        dist = getattr(entry_point.dist, "name", "an unknown distribution")
        if entry_point.name in owners:
            raise PluginError(
                f"two plugins are named {entry_point.name!r}: one from {owners[entry_point.name]}, one from "
                f"{dist} ({entry_point.value}); uninstall one, or block the name with LATENTRT_BLOCK_PLUGINS"
            )
        try:
            plugin = entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {entry_point.name!r} ({entry_point.value}, from {dist}) failed to import: "
                f"{type(exc).__name__}: {exc}; fix or uninstall it, or skip it with "
                f"LATENTRT_BLOCK_PLUGINS={entry_point.name}"
            ) from exc
        _register_plugin(manager, plugin, entry_point.name)
        owners[entry_point.name] = dist


def _run_register_hooks(manager: pluggy.PluginManager) -> Registry:
    registry = Registry()
    for impl in manager.hook.latentrt_register.get_hookimpls():  # registration order
        with registry.registering(impl.plugin_name):
            try:
                impl.function(**{arg: registry for arg in impl.argnames})
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed while registering: {type(exc).__name__}: {exc}"
                ) from exc
    return registry


def build_registry(
    *,
    autoload: bool | None = None,
    blocked: Iterable[str] | None = None,
    plugins: Sequence[tuple[str, object]] = (),
) -> Registry:
    """Load plugins and run their ``latentrt_register`` hooks into a new :class:`Registry`.

    ``autoload`` defaults to ``not LATENTRT_DISABLE_PLUGIN_AUTOLOAD``; ``blocked`` to the
    names in ``LATENTRT_BLOCK_PLUGINS``; ``plugins`` are extra ``(name, plugin)`` pairs
    registered after the built-ins (handy in tests and embedding applications).
    """
    if autoload is None:
        autoload = not _env_flag("LATENTRT_DISABLE_PLUGIN_AUTOLOAD")
    blocked_names = _blocked_from_env() if blocked is None else set(blocked)
    manager = make_plugin_manager()
    for name in blocked_names:
        manager.set_blocked(name)
    _load_builtins(manager, blocked_names)
    for name, plugin in plugins:
        if name not in blocked_names:
            _register_plugin(manager, plugin, name)
    if autoload:
        _load_entry_points(manager, blocked_names)
    return _run_register_hooks(manager)


_lock = threading.Lock()
_registry: Registry | None = None


def registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, built on first use (thread-safe); ``reload`` rebuilds it."""
    global _registry
    with _lock:
        if _registry is None or reload:
            _registry = build_registry()
        return _registry


def reset_registry() -> None:
    """Forget the process-wide registry so the next :func:`registry` call reloads plugins."""
    global _registry
    with _lock:
        _registry = None
