"""The plugin registry: loading, naming, blocking, error reporting (DESIGN.md section 3).

These tests build private registries with :func:`build_registry` and fake plugins (module
objects with a ``@hookimpl`` hook, fake entry points), so they do not depend on which
third-party plugins happen to be installed or which built-in samplers exist yet.
"""

from __future__ import annotations

import importlib.metadata
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import latentrt
from latentrt.core import registry as registry_module
from latentrt.core.errors import InvalidRequest, PluginError
from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import BUILTIN_PLUGINS, Registry, build_registry, reset_registry
from latentrt.plugins.samplers.euler import sample_euler
from latentrt.testing import GaussianTarget

SAMPLERS_PLUGIN = "latentrt.samplers"
SCHEDULES_PLUGIN = "latentrt.schedules"
BUILTIN_NAMES = [name for name, _ in BUILTIN_PLUGINS]
FAKE_MODULE = "latentrt_fake_entry_point_plugin"


def make_plugin(name: str, register: Callable[[Registry], object]) -> types.ModuleType:
    """A module-like plugin object whose ``latentrt_register`` hook runs ``register``."""
    module = types.ModuleType(name)

    @latentrt.hookimpl
    def latentrt_register(registry: Registry) -> None:
        register(registry)

    module.latentrt_register = latentrt_register  # type: ignore[attr-defined]
    return module


def sample_dummy(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """A do-nothing sampler."""
    return x


def _sigmas(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.fixture
def builtins() -> Registry:
    """Built-in plugins only: no entry points, nothing blocked."""
    return build_registry(autoload=False, blocked=())


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> list[importlib.metadata.EntryPoint]:
    """Replace the installed ``latentrt`` entry points with a list the test fills.

    ``FAKE_MODULE`` is importable (it lives in ``sys.modules``) and registers ``fake_sampler``.
    """
    module = make_plugin(FAKE_MODULE, lambda r: r.add_sampler("fake_sampler", sample_dummy, label="Fake"))
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    points: list[importlib.metadata.EntryPoint] = []

    def entry_points(**selection: Any) -> list[importlib.metadata.EntryPoint]:
        assert selection == {"group": "latentrt"}
        return list(points)

    # latentrt.core.registry calls importlib.metadata.entry_points at build time
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.delenv("LATENTRT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("LATENTRT_BLOCK_PLUGINS", raising=False)
    return points


def _entry_point(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group="latentrt")


# -- built-ins and lookups -------------------------------------------------------------


def test_builtins_registered_under_their_plugin_names(builtins: Registry) -> None:
    assert builtins.plugins[:3] == [SAMPLERS_PLUGIN, SCHEDULES_PLUGIN, "latentrt.stable_diffusion"]
    assert builtins.sampler("euler").plugin == SAMPLERS_PLUGIN
    assert builtins.sampler("euler_ancestral").plugin == SAMPLERS_PLUGIN
    assert builtins.scheduler("karras").plugin == SCHEDULES_PLUGIN
    assert {spec.plugin for spec in builtins.samplers.values()} == {SAMPLERS_PLUGIN}
    assert {spec.plugin for spec in builtins.schedulers.values()} == {SCHEDULES_PLUGIN}


def test_process_registry_has_the_builtins(registry: Registry) -> None:
    assert {SAMPLERS_PLUGIN, SCHEDULES_PLUGIN} <= set(registry.plugins)
    assert registry.sampler("euler").fn is sample_euler


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("euler", "euler"),
        ("EULER", "euler"),
        ("Euler", "euler"),
        ("k_euler", "euler"),
        ("K_Euler", "euler"),
        ("  euler  ", "euler"),
        ("euler_ancestral", "euler_ancestral"),
        ("Euler a", "euler_ancestral"),
        ("EULER A", "euler_ancestral"),
        ("k_euler_a", "euler_ancestral"),
        ("k_euler_ancestral", "euler_ancestral"),
    ],
)
def test_sampler_lookup_by_name_label_alias_any_case(builtins: Registry, spelling: str, name: str) -> None:
    assert builtins.sampler(spelling).name == name


@pytest.mark.parametrize("spelling", ["karras", "Karras", "KARRAS"])
def test_scheduler_lookup_any_case(builtins: Registry, spelling: str) -> None:
    assert builtins.scheduler(spelling).name == "karras"


def test_mappings_are_read_only_and_keyed_by_canonical_name(builtins: Registry) -> None:
    assert "euler" in builtins.samplers
    assert "Euler" not in builtins.samplers
    with pytest.raises(TypeError):
        builtins.samplers["x"] = builtins.samplers["euler"]  # type: ignore[index]


def test_unknown_sampler_lists_closest_names(builtins: Registry) -> None:
    with pytest.raises(PluginError, match="unknown sampler 'eulr'") as info:
        builtins.sampler("eulr")
    message = str(info.value)
    assert "did you mean" in message
    assert "'euler'" in message.lower()  # suggested as the name or as its label "Euler"
    assert "valid names:" in message
    assert "euler_ancestral" in message


def test_unknown_name_without_close_match_still_lists_valid_names(builtins: Registry) -> None:
    with pytest.raises(PluginError, match=r"valid names: .*karras") as info:
        builtins.scheduler("zzzzzzzz")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("bad", [None, 3, ""])
def test_lookup_of_non_names_is_a_plugin_error(builtins: Registry, bad: Any) -> None:
    with pytest.raises(PluginError, match="unknown sampler"):
        builtins.sampler(bad)


def test_spec_metadata(builtins: Registry) -> None:
    euler = builtins.sampler("euler")
    assert euler.label == "Euler"
    assert euler.noise == "gaussian"  # s_churn > 0 draws noise, so the pipeline hands it a source
    assert builtins.sampler("euler_ancestral").noise == "gaussian"
    assert euler.description == "Euler's method on the probability-flow ODE, with optional churn (Karras Algorithm 2)."
    assert euler.options == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


# -- sampler + schedule labels -----------------------------------------------------------


def test_sampler_and_scheduler_splits_a1111_labels(builtins: Registry) -> None:
    sampler, schedule = builtins.sampler_and_scheduler("Euler Karras")
    assert (sampler.name, schedule and schedule.name) == ("euler", "karras")
    sampler, schedule = builtins.sampler_and_scheduler("Euler a Karras")
    assert (sampler.name, schedule and schedule.name) == ("euler_ancestral", "karras")
    sampler, schedule = builtins.sampler_and_scheduler("k_euler_a karras")
    assert (sampler.name, schedule and schedule.name) == ("euler_ancestral", "karras")


@pytest.mark.parametrize("label", ["Euler", "Euler a", "euler_ancestral"])
def test_sampler_and_scheduler_without_schedule(builtins: Registry, label: str) -> None:
    sampler, schedule = builtins.sampler_and_scheduler(label)
    assert sampler.name == builtins.sampler(label).name
    assert schedule is None


def test_sampler_and_scheduler_dpmpp_2m_karras() -> None:
    # A stand-in dpmpp_2m, so the test does not depend on the built-in's state.
    plugin = make_plugin("dpm", lambda r: r.add_sampler("dpmpp_2m", sample_dummy, label="DPM++ 2M"))
    reg = build_registry(autoload=False, blocked=[SAMPLERS_PLUGIN], plugins=[("dpm", plugin)])
    sampler, schedule = reg.sampler_and_scheduler("DPM++ 2M Karras")
    assert sampler.name == "dpmpp_2m"
    assert schedule is not None
    assert schedule.name == "karras"


def test_sampler_and_scheduler_dpmpp_2m_karras_builtin(builtins: Registry) -> None:
    if "dpmpp_2m" not in builtins.samplers:
        pytest.skip("built-in dpmpp_2m not registered yet")
    sampler, schedule = builtins.sampler_and_scheduler("DPM++ 2M Karras")
    assert (sampler.name, schedule and schedule.name) == ("dpmpp_2m", "karras")


@pytest.mark.parametrize("label", ["Euler Bogus", "Bogus Karras", "Karras", ""])
def test_sampler_and_scheduler_unknown(builtins: Registry, label: str) -> None:
    with pytest.raises(PluginError, match="unknown sampler"):
        builtins.sampler_and_scheduler(label)


# -- registration errors -------------------------------------------------------------------


def test_duplicate_sampler_name_names_both_plugins() -> None:
    dup = make_plugin("dup", lambda r: r.add_sampler("euler", sample_dummy, label="Another Euler"))
    with pytest.raises(PluginError) as info:
        build_registry(autoload=False, blocked=(), plugins=[("dup", dup)])
    message = str(info.value)
    assert "'euler'" in message
    assert "'dup'" in message
    assert f"'{SAMPLERS_PLUGIN}'" in message


@pytest.mark.parametrize(
    ("kwargs", "taken"),
    [
        ({"name": "my_sampler", "label": "euler a"}, "euler a"),  # label clashes with a label
        ({"name": "my_sampler", "aliases": ("K_EULER",)}, "K_EULER"),  # alias clashes with an alias
        ({"name": "Euler_Ancestral"}, "Euler_Ancestral"),  # name clashes, case-insensitively
    ],
)
def test_clashing_label_or_alias_names_both_plugins(kwargs: dict[str, Any], taken: str) -> None:
    def register(registry: Registry) -> None:
        registry.add_sampler(fn=sample_dummy, **kwargs)

    with pytest.raises(PluginError, match="already taken") as info:
        build_registry(autoload=False, blocked=(), plugins=[("clash", make_plugin("clash", register))])
    message = str(info.value)
    assert repr(taken) in message
    assert "'clash'" in message
    assert f"'{SAMPLERS_PLUGIN}'" in message


def test_same_name_in_two_kinds_is_fine() -> None:
    plugin = make_plugin("both", lambda r: r.add_scheduler("euler", lambda steps, ms: _sigmas(1.0, 0.0)))
    reg = build_registry(autoload=False, blocked=(), plugins=[("both", plugin)])
    assert reg.scheduler("euler").plugin == "both"
    assert reg.sampler("euler").plugin == SAMPLERS_PLUGIN


def test_duplicate_plugin_name_is_a_plugin_error() -> None:
    plugin = make_plugin("again", lambda r: None)
    with pytest.raises(PluginError, match=f"plugin '{SAMPLERS_PLUGIN}' could not be registered"):
        build_registry(autoload=False, blocked=(), plugins=[(SAMPLERS_PLUGIN, plugin)])


def test_hook_that_raises_is_reported_with_plugin_and_original_error() -> None:
    def register(registry: Registry) -> None:
        raise ZeroDivisionError("boom in hook")

    with pytest.raises(PluginError) as info:
        build_registry(autoload=False, blocked=(), plugins=[("exploding", make_plugin("exploding", register))])
    message = str(info.value)
    assert "'exploding'" in message
    assert "ZeroDivisionError: boom in hook" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    "register",
    [
        lambda r: r.add_sampler("bad", 3),
        lambda r: r.add_sampler(" padded ", sample_dummy),
        lambda r: r.add_sampler("", sample_dummy),
        lambda r: r.add_sampler("bad", sample_dummy, noise="pink"),
        lambda r: r.add_scheduler("bad", None),
    ],
    ids=["not-callable", "padded-name", "empty-name", "bad-noise-kind", "scheduler-not-callable"],
)
def test_invalid_registrations_are_plugin_errors(register: Callable[[Registry], None]) -> None:
    with pytest.raises(PluginError):
        build_registry(autoload=False, blocked=(), plugins=[("sloppy", make_plugin("sloppy", register))])


def test_invalid_registration_error_names_the_plugin() -> None:
    plugin = make_plugin("sloppy", lambda r: r.add_sampler("bad", 3))  # type: ignore[arg-type]
    with pytest.raises(PluginError) as info:
        build_registry(autoload=False, blocked=(), plugins=[("sloppy", plugin)])
    assert "'sloppy'" in str(info.value)


def test_components_register_and_resolve() -> None:
    def register(registry: Registry) -> None:
        registry.add_model_family("toy15", dict, label="Toy Diffusion 1.5", aliases=("toy1",))
        registry.add_exporter("toy_onnx", dict)  # onnx and torch are built-in names
        registry.add_runtime("toy_torch", dict, description="eager PyTorch")

    reg = build_registry(autoload=False, blocked=(), plugins=[("parts", make_plugin("parts", register))])
    assert reg.model_family("TOY1").name == "toy15"
    assert reg.model_family("toy diffusion 1.5").plugin == "parts"
    assert reg.exporter("toy_onnx").factory is dict
    assert reg.runtime("Toy_Torch").description == "eager PyTorch"
    assert reg.plugins[-1] == "parts"
    with pytest.raises(PluginError, match="unknown runtime 'openvino'"):
        reg.runtime("openvino")


def test_direct_registration_without_a_plugin() -> None:
    reg = Registry()
    spec = reg.add_sampler("mine", sample_dummy)
    assert (spec.plugin, spec.label, spec.description) == ("<direct>", "mine", "A do-nothing sampler.")
    with reg.registering("embedder"):
        assert reg.add_sampler("theirs", sample_dummy).plugin == "embedder"
    assert reg.plugins == ["embedder"]


# -- blocking and entry points ------------------------------------------------------------


def test_blocked_builtin_schedules() -> None:
    reg = build_registry(autoload=False, blocked=[SCHEDULES_PLUGIN])
    assert dict(reg.schedulers) == {}
    assert SCHEDULES_PLUGIN not in reg.plugins
    assert "euler" in reg.samplers
    with pytest.raises(PluginError, match="none registered"):
        reg.scheduler("karras")


def test_blocked_extra_plugin_is_not_registered() -> None:
    plugin = make_plugin("extra", lambda r: r.add_sampler("extra_sampler", sample_dummy))
    reg = build_registry(autoload=False, blocked=["extra"], plugins=[("extra", plugin)])
    assert "extra_sampler" not in reg.samplers


def test_entry_point_plugins_load_under_their_names(fake_entry_points: list[importlib.metadata.EntryPoint]) -> None:
    fake_entry_points.append(_entry_point("fake", FAKE_MODULE))
    reg = build_registry()
    assert reg.sampler("FAKE").name == "fake_sampler"
    assert reg.sampler("fake_sampler").plugin == "fake"
    assert reg.plugins == [*BUILTIN_NAMES, "fake"]


def test_entry_point_that_fails_to_import(fake_entry_points: list[importlib.metadata.EntryPoint]) -> None:
    fake_entry_points.append(_entry_point("broken", "no_such_module_xyz"))
    with pytest.raises(PluginError) as info:
        build_registry()
    message = str(info.value)
    assert "'broken'" in message
    assert "no_such_module_xyz" in message
    assert "ModuleNotFoundError" in message
    assert "LATENTRT_BLOCK_PLUGINS=broken" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize("name", ["fake", SAMPLERS_PLUGIN])
def test_two_entry_points_with_one_name_are_refused(
    fake_entry_points: list[importlib.metadata.EntryPoint], name: str
) -> None:
    """A second plugin under a name already taken (by another package, or a built-in) is never dropped silently."""
    copies = 1 if name == SAMPLERS_PLUGIN else 2  # a built-in already holds its own name
    fake_entry_points.extend([_entry_point(name, FAKE_MODULE)] * copies)
    with pytest.raises(PluginError, match=rf"two plugins are named '{name}'.*LATENTRT_BLOCK_PLUGINS"):
        build_registry()


@pytest.mark.parametrize(
    "fn",
    [lambda x: x, lambda denoiser, x: x, lambda denoiser, x, sigmas: x],
    ids=["one-arg", "two-args", "no-keywords"],
)
def test_sampler_breaking_the_contract_is_refused_at_registration(fn: Callable[..., object]) -> None:
    plugin = make_plugin("sloppy", lambda r: r.add_sampler("bad", fn))
    with pytest.raises(PluginError, match=r"plugin 'sloppy': sampler 'bad' breaks the sampler contract"):
        build_registry(autoload=False, blocked=(), plugins=[("sloppy", plugin)])


def test_entry_point_whose_import_raises(fake_entry_points: list[importlib.metadata.EntryPoint]) -> None:
    fake_entry_points.append(_entry_point("attr_missing", f"{FAKE_MODULE}:no_such_attribute"))
    with pytest.raises(PluginError, match=r"'attr_missing'.*failed to import: AttributeError"):
        build_registry()


def test_broken_entry_point_can_be_blocked_or_skipped(fake_entry_points: list[importlib.metadata.EntryPoint]) -> None:
    fake_entry_points.append(_entry_point("broken", "no_such_module_xyz"))
    assert "euler" in build_registry(blocked=["broken"]).samplers
    assert "euler" in build_registry(autoload=False).samplers


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_env_disable_autoload(
    fake_entry_points: list[importlib.metadata.EntryPoint], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    fake_entry_points.extend([_entry_point("fake", FAKE_MODULE), _entry_point("broken", "no_such_module_xyz")])
    monkeypatch.setenv("LATENTRT_DISABLE_PLUGIN_AUTOLOAD", value)
    reg = build_registry()
    assert "fake_sampler" not in reg.samplers
    assert reg.plugins == BUILTIN_NAMES
    assert "fake_sampler" in build_registry(autoload=True, blocked=["broken"]).samplers  # argument wins


@pytest.mark.parametrize("value", ["0", "", "no"])
def test_env_autoload_stays_on(
    fake_entry_points: list[importlib.metadata.EntryPoint], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    fake_entry_points.append(_entry_point("fake", FAKE_MODULE))
    monkeypatch.setenv("LATENTRT_DISABLE_PLUGIN_AUTOLOAD", value)
    assert "fake_sampler" in build_registry().samplers


def test_env_block_plugins(
    fake_entry_points: list[importlib.metadata.EntryPoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_entry_points.extend([_entry_point("fake", FAKE_MODULE), _entry_point("broken", "no_such_module_xyz")])
    monkeypatch.setenv("LATENTRT_BLOCK_PLUGINS", " broken , latentrt.schedules,,")
    reg = build_registry()
    assert "fake_sampler" in reg.samplers
    assert dict(reg.schedulers) == {}
    assert reg.plugins == [SAMPLERS_PLUGIN, "latentrt.stable_diffusion", "latentrt.demo", "latentrt.runtimes", "fake"]
    monkeypatch.setenv("LATENTRT_BLOCK_PLUGINS", "broken,fake,latentrt.samplers")
    reg = build_registry()
    assert dict(reg.samplers) == {}
    assert "karras" in reg.schedulers
    assert "fake_sampler" in build_registry(blocked=["broken"]).samplers  # argument wins over the env


def test_env_blocks_the_process_registry(
    fake_entry_points: list[importlib.metadata.EntryPoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_entry_points.append(_entry_point("fake", FAKE_MODULE))
    monkeypatch.setenv("LATENTRT_BLOCK_PLUGINS", "fake")
    try:
        assert "fake_sampler" not in latentrt.registry(reload=True).samplers
        monkeypatch.delenv("LATENTRT_BLOCK_PLUGINS")
        assert "fake_sampler" in latentrt.registry(reload=True).samplers
    finally:
        reset_registry()


# -- checked sampling and schedules ---------------------------------------------------------


@pytest.mark.parametrize(
    ("sigmas", "match"),
    [
        (_sigmas(1.0, 2.0, 0.0), "strictly decreasing"),
        (_sigmas(2.0, 2.0, 0.0), "strictly decreasing"),
        (_sigmas(2.0, 1.0), "end with 0"),
        (_sigmas(2.0, float("nan"), 0.0), "finite"),
        (_sigmas(float("inf"), 1.0, 0.0), "finite"),
        (_sigmas(2.0, -1.0, 0.0), ">= 0"),
        (_sigmas(0.0), "1-D"),
        (torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64), "1-D"),
        ([2.0, 1.0, 0.0], "1-D"),
    ],
    ids=["increasing", "repeated", "no-final-zero", "nan", "inf", "negative", "one-value", "2-d", "list"],
)
def test_sample_refuses_bad_sigmas(builtins: Registry, sigmas: Any, match: str) -> None:
    target = GaussianTarget()
    x = target.start((1, 1, 4, 4), 2.0)
    with pytest.raises(InvalidRequest, match=match):
        builtins.sampler("euler").sample(target.denoiser(), x, sigmas)


def test_sample_refuses_unknown_options_naming_valid_ones(builtins: Registry) -> None:
    target = GaussianTarget()
    x = target.start((1, 1, 4, 4), 2.0)
    with pytest.raises(InvalidRequest, match="'euler' does not take option") as info:
        builtins.sampler("euler").sample(target.denoiser(), x, _sigmas(2.0, 1.0, 0.0), eta=0.5)
    message = str(info.value)
    assert "eta" in message
    for option in ("s_churn", "s_noise", "s_tmax", "s_tmin"):
        assert option in message
    assert isinstance(info.value, ValueError)


def test_sample_runs_with_valid_sigmas_and_options(builtins: Registry) -> None:
    target = GaussianTarget()
    x = target.start((2, 1, 4, 4), 2.0)
    out = builtins.sampler("Euler").sample(target.denoiser(), x, _sigmas(2.0, 1.0, 0.0), s_noise=1.0)
    assert out.shape == x.shape


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10"])
def test_scheduler_refuses_bad_steps(builtins: Registry, steps: Any) -> None:
    with pytest.raises(InvalidRequest, match="steps must be an integer"):
        builtins.scheduler("karras").sigmas(steps, sd_model_sampling())


def test_scheduler_output_is_checked() -> None:
    plugin = make_plugin("wrong", lambda r: r.add_scheduler("rising", lambda steps, ms: torch.arange(steps + 1.0)))
    reg = build_registry(autoload=False, blocked=(), plugins=[("wrong", plugin)])
    with pytest.raises(InvalidRequest):
        reg.scheduler("rising").sigmas(4, sd_model_sampling())


# -- the process-wide registry ---------------------------------------------------------------


@pytest.fixture
def fresh_process_registry() -> Iterator[None]:
    reset_registry()
    yield
    reset_registry()


@pytest.mark.usefixtures("fresh_process_registry")
def test_registry_is_cached_and_reloadable() -> None:
    first = latentrt.registry()
    assert latentrt.registry() is first
    reloaded = latentrt.registry(reload=True)
    assert reloaded is not first
    assert latentrt.registry() is reloaded
    reset_registry()
    assert latentrt.registry() is not reloaded


@pytest.mark.usefixtures("fresh_process_registry")
def test_registry_is_built_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Registry] = []
    real_build = registry_module.build_registry

    def slow_build(**kwargs: Any) -> Registry:
        time.sleep(0.05)  # widen the window in which an unlocked cache would build twice
        built = real_build(**kwargs)
        builds.append(built)
        return built

    monkeypatch.setattr(registry_module, "build_registry", slow_build)
    n = 8
    barrier = threading.Barrier(n)
    results: list[Registry | None] = [None] * n

    def worker(k: int) -> None:
        barrier.wait()
        results[k] = latentrt.registry()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(builds) == 1
    assert all(result is builds[0] for result in results)
