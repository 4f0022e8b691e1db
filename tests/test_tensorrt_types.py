"""The TensorRT code type-checks against ``tensorrt-stubs``, and a misspelt TensorRT call fails the check.

``tools/check_tensorrt_types.py`` patches a temporary copy of the installed stubs and runs mypy on the
modules that call TensorRT. ``make install`` installs the stubs, so in CI these tests always run; a
machine without them skips the mypy runs and says how to install them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import check_tensorrt_types as checker

REPO = Path(__file__).resolve().parent.parent

needs_stubs = pytest.mark.skipif(
    checker.stubs_root() is None,
    reason="tensorrt-stubs is not installed, so the TensorRT code cannot be type-checked here: "
    "pip install --no-deps tensorrt-stubs (make install does)",
)

# (module, a correct call in it, the same call misspelt, what mypy says about the misspelling)
MUTATIONS = [
    (
        "latentrt/runtimes/tensorrt.py",
        "execute_async_v3(",
        "execute_async_v4(",
        '"IExecutionContext" has no attribute "execute_async_v4"',
    ),
    (
        "latentrt/runtimes/tensorrt.py",
        "set_tensor_address(",
        "set_tensor_adress(",
        '"IExecutionContext" has no attribute "set_tensor_adress"',
    ),
    (
        "latentrt/exporters/tensorrt_build.py",
        "create_optimization_profile(",
        "create_optimisation_profile(",
        '"Builder" has no attribute "create_optimisation_profile"',
    ),
    (
        "latentrt/exporters/tensorrt_build.py",
        "trt.BuilderFlag.REFIT",
        "trt.BuilderFlag.REFITABLE",
        '"type[BuilderFlag]" has no attribute "REFITABLE"',
    ),
    (
        "latentrt/exporters/tensorrt_build.py",
        "parse_from_file(",
        "parse_from_files(",
        '"OnnxParser" has no attribute "parse_from_files"',
    ),
    (
        "latentrt/runtimes/tensorrt_refit.py",
        "set_named_weights(",
        "set_named_weight(",
        '"Refitter" has no attribute "set_named_weight"',
    ),
]


def test_patch_fixes_the_three_slips_mypy_rejects() -> None:
    keyword = "    def get_workspace_size(self, in: list[PluginTensorDesc], out: list[PluginTensorDesc]) -> int:\n"
    assert checker.patch_stub(keyword) == keyword.replace("(self, in:", "(self, in_:")
    defaults = (
        "    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, scale: Weights = None, "
        "power: Weights = None, channel_axis: int) -> IScaleLayer:\n"
    )
    assert "power: Weights = None, channel_axis: int = ...) -> IScaleLayer:" in checker.patch_stub(defaults)
    keyword_only = "    def f(self, a: int = 1, *, b: int) -> None:\n"
    assert checker.patch_stub(keyword_only) == keyword_only  # keyword-only parameters may follow defaults
    module = "from __future__ import annotations\nimport tensorrt_libs as tensorrt_libs\n"
    module += "__all__ = ['bool', 'tensorrt_libs']\n"
    assert checker.patch_stub(module) == "from __future__ import annotations\nimport builtins\n__all__ = ['bool']\n"


def test_patch_points_bool_annotations_at_the_builtin() -> None:
    """The stubs' module-level ``bool: DataType`` would make every ``-> bool`` an unknown type."""
    text = "bool: DataType  # value = <DataType.BOOL: 4>\n    def refit_cuda_engine(self) -> bool:\n    x: list[bool]\n"
    assert checker.patch_stub(text) == (
        "bool: DataType  # value = <DataType.BOOL: 4>\n    def refit_cuda_engine(self) -> builtins.bool:\n"
        "    x: list[builtins.bool]\n"
    )


@needs_stubs
def test_tensorrt_modules_type_check_against_the_stubs() -> None:
    status, output = checker.check(list(checker.MODULES))
    assert status == 0, output
    assert f"Success: no issues found in {len(checker.MODULES)} source files" in output


@needs_stubs
def test_misspelt_tensorrt_calls_are_caught(tmp_path: Path) -> None:
    """A scratch module and copies of our modules with one TensorRT call misspelt each: mypy reports every one."""
    scratch = tmp_path / "trt_scratch.py"
    scratch.write_text(
        "import tensorrt as trt\n\n\n"
        "def build(logger: trt.ILogger, context: trt.IExecutionContext) -> bool:\n"
        "    builder = trt.Builder(logger)\n"
        "    builder.create_netwrk(0)\n"
        "    return context.execute_async_v3(0)\n"
    )
    files = [str(scratch)]
    for index, (module, right, wrong, _) in enumerate(MUTATIONS):
        source = (REPO / module).read_text(encoding="utf-8")
        assert right in source, f"{module} no longer calls {right}: update MUTATIONS"
        copy = tmp_path / f"mutant_{index}.py"
        copy.write_text(source.replace(right, wrong, 1), encoding="utf-8")
        files.append(str(copy))
    status, output = checker.check(files)
    assert status == 1, output
    assert 'trt_scratch.py:6: error: "Builder" has no attribute "create_netwrk"; maybe "create_network"?' in output
    for index, (_, _, _, message) in enumerate(MUTATIONS):
        assert any(f"mutant_{index}.py" in line and message in line for line in output.splitlines()), (message, output)
    assert f"Found {1 + len(MUTATIONS)} errors in {1 + len(MUTATIONS)} files" in output


def test_missing_stubs_are_reported_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checker, "stubs_root", lambda: None)
    status, output = checker.check(list(checker.MODULES))
    assert status == checker.NOT_INSTALLED and "pip install --no-deps tensorrt-stubs" in output
