"""The third-party plugin round trip, with the real example package.

Builds and pip-installs ``examples/sampler-plugin`` into the test environment (offline:
``--no-index --no-build-isolation``, with the environment's own setuptools), then checks
in fresh interpreters that latentrt discovers it through its entry point, that the
sampler works by name and by label, that the plugin's own conformance tests pass, that
``LATENTRT_DISABLE_PLUGIN_AUTOLOAD`` and ``LATENTRT_BLOCK_PLUGINS`` hide it, and that
uninstalling removes it. The whole module stays under ``BUDGET_S`` seconds.

While this module runs, other processes using the same environment see the plugin too;
a lock file keeps two runs of this module from installing over each other.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sampler-plugin"
DIST = "latentrt-example-sampler"
PLUGIN = "example_sampler"
SAMPLER = "euler_midpoint"
LABEL = "Euler Midpoint"
BUDGET_S = 55.0
"""Wall-clock budget for everything this module runs (install, 5 interpreters, uninstall); ~25 s usual."""
SETUPTOOLS_MIN = (77,)

# Runs in a fresh interpreter: the registry as JSON, and a run of each sampler named in
# argv on the Gaussian target, with its error against the exact solution.
QUERY = r"""
import json, sys
import torch
import latentrt
from latentrt.testing import GaussianTarget

reg = latentrt.registry()
out = {
    "plugins": reg.plugins,
    "samplers": {
        n: {"label": s.label, "plugin": s.plugin, "aliases": list(s.aliases)} for n, s in reg.samplers.items()
    },
    "runs": {},
}
target = GaussianTarget()
sigmas = torch.cat([torch.linspace(10.0, 0.1, 50, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
x = target.start((2, 1, 8, 8), 10.0, seed=0)
exact = target.denoiser()(target.ode_solution(x, 10.0, 0.1), torch.full((2,), 0.1, dtype=torch.float64))
for spelling in sys.argv[1:]:
    try:
        spec = reg.sampler(spelling)
    except latentrt.PluginError as exc:
        out["runs"][spelling] = {"error": str(exc)}
        continue
    result = spec.sample(target.denoiser(), x.clone(), sigmas)
    out["runs"][spelling] = {"name": spec.name, "plugin": spec.plugin, "error": float((result - exact).abs().max())}
print(json.dumps(out))
"""


@dataclass
class Example:
    """The installed example: its build copy, and a clock for the module's budget."""

    source: Path
    deadline: float

    def run(self, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
        """Run ``python *args`` in a clean environment within the budget; its stdout, or fail."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"plugin example tests ran over their {BUDGET_S:.0f} s budget")
        try:
            proc = subprocess.run(
                [sys.executable, *args],
                capture_output=True,
                text=True,
                timeout=remaining,
                env=_clean_env(env),
                cwd=cwd or self.source.parent,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args[:4]} ran past the {BUDGET_S:.0f} s budget of the plugin example tests")
        if proc.returncode != 0:
            pytest.fail(f"{args[:4]} exited with {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def query(self, *spellings: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The registry a fresh interpreter builds, and runs of ``spellings``."""
        result: dict[str, Any] = json.loads(self.run("-c", QUERY, *spellings, env=env).strip().splitlines()[-1])
        return result

    def pip(self, *args: str) -> str:
        """``pip *args`` in the test environment, offline and quiet."""
        return self.run("-m", "pip", "--disable-pip-version-check", "--no-input", *args)


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LATENTRT_", "PYTEST_"))}
    env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


def _installed() -> bool:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _setuptools_ok() -> bool:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(p) for p in version.split(".")[:1] if p.isdigit()) >= SETUPTOOLS_MIN


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    """Install the example plugin for the module; uninstall it afterwards whatever happens."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("installs a package: run the tests from a virtual environment")
    lock = _lock()  # waits while another test session has the example installed
    deadline = time.monotonic() + BUDGET_S
    try:
        source = tmp_path_factory.mktemp("plugin") / "sampler-plugin"
        # build from a copy, so the build/ and *.egg-info pip leaves stay out of the repository
        shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
        ex = Example(source, deadline)
        if not _setuptools_ok():  # the offline build needs it; fetching it is the only networked step
            try:
                ex.pip("install", "-q", f"setuptools>={SETUPTOOLS_MIN[0]}")
            except pytest.fail.Exception:
                pytest.skip(f"building the example offline needs setuptools>={SETUPTOOLS_MIN[0]} in the test venv")
        if _installed():  # left over from an interrupted run
            ex.pip("uninstall", "-y", "-q", DIST)
        try:
            ex.pip("install", "-q", "--no-deps", "--no-index", "--no-build-isolation", str(source))
            yield ex
        finally:
            if _installed():
                subprocess.run(
                    [sys.executable, "-m", "pip", "uninstall", "-y", "-q", DIST],
                    capture_output=True,
                    timeout=60,
                    check=False,
                    env=_clean_env(),
                )
    finally:
        lock.close()


class _Lock:
    def __init__(self, path: Path) -> None:
        self.file = path.open("w")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass

    def close(self) -> None:
        self.file.close()  # closing releases the lock


def _lock() -> _Lock:
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]  # the same in every process
    return _Lock(Path(tempfile.gettempdir()) / f"latentrt-example-plugin-{key}.lock")


def test_installed_plugin_is_discovered(example: Example) -> None:
    result = example.query(SAMPLER, LABEL, LABEL.upper(), "rk2_midpoint", "euler")
    assert PLUGIN in result["plugins"]
    assert result["samplers"][SAMPLER] == {"label": LABEL, "plugin": PLUGIN, "aliases": ["rk2_midpoint"]}
    # the built-ins are untouched
    assert result["samplers"]["euler"]["plugin"] == "latentrt.samplers"
    runs = result["runs"]
    for spelling in (SAMPLER, LABEL, LABEL.upper(), "rk2_midpoint"):
        assert runs[spelling]["name"] == SAMPLER
        assert runs[spelling]["plugin"] == PLUGIN
        assert runs[spelling]["error"] < 1e-3
    # same denoiser, same steps: the second-order sampler is far closer than Euler
    assert runs[SAMPLER]["error"] < runs["euler"]["error"] / 10


def test_cli_lists_it_with_its_plugin(example: Example) -> None:
    """``latentrt plugins`` and ``latentrt plugins --json`` show the installed sampler next to the built-ins."""
    listing = json.loads(example.run("-m", "latentrt.cli", "plugins", "--json"))
    rows = {(row["kind"], row["name"]): row for row in listing["components"]}
    assert PLUGIN in listing["plugins"]
    assert rows[("sampler", SAMPLER)]["plugin"] == PLUGIN
    assert rows[("sampler", SAMPLER)]["label"] == LABEL
    assert rows[("sampler", "euler")]["plugin"] == "latentrt.samplers"
    table = example.run("-m", "latentrt.cli", "plugins")
    line = next(line for line in table.splitlines() if line.strip().startswith(SAMPLER))
    assert f'"{LABEL}"' in line
    assert f"[{PLUGIN}]" in line


def test_example_conformance_tests_pass(example: Example) -> None:
    out = example.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=example.source)
    assert " passed" in out
    assert "failed" not in out
    assert "skipped" not in out


def test_disable_autoload_hides_it(example: Example) -> None:
    result = example.query(SAMPLER, env={"LATENTRT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert PLUGIN not in result["plugins"]
    assert SAMPLER not in result["samplers"]
    assert "euler" in result["samplers"]
    assert f"unknown sampler '{SAMPLER}'" in result["runs"][SAMPLER]["error"]


def test_block_plugins_blocks_it(example: Example) -> None:
    result = example.query(LABEL, env={"LATENTRT_BLOCK_PLUGINS": PLUGIN})
    assert PLUGIN not in result["plugins"]
    assert SAMPLER not in result["samplers"]
    assert "euler" in result["samplers"]
    assert "unknown sampler" in result["runs"][LABEL]["error"]


def test_uninstall_removes_it(example: Example) -> None:
    # last in the module: the fixture's teardown only cleans up if this did not run
    example.pip("uninstall", "-y", "-q", DIST)
    assert not _installed()
    result = example.query(SAMPLER)
    assert PLUGIN not in result["plugins"]
    assert SAMPLER not in result["samplers"]
    assert f"unknown sampler '{SAMPLER}'" in result["runs"][SAMPLER]["error"]
    importable = example.run("-c", "import importlib.util; print(importlib.util.find_spec('latentrt_example_sampler'))")
    assert importable.strip() == "None"
