"""Type-check latentrt's TensorRT code against the ``tensorrt-stubs`` package, so a misspelt API call fails CI.

TensorRT cannot be installed on machines without an NVIDIA GPU, but its type stubs can
(``pip install --no-deps tensorrt-stubs``; ``make install`` does). Installed as is, mypy cannot use them:
they land in ``site-packages/tensorrt/`` without a ``py.typed`` marker, so mypy treats ``tensorrt`` as
untyped and checks nothing; and the generated ``.pyi`` files (10.13) have three slips mypy rejects:

1. parameters named ``in`` (a keyword): ``def get_workspace_size(self, in: list[...], out: ...)``;
2. parameters without defaults after ones with defaults:
   ``def add_scale_nd(self, input, mode, shift: Weights = None, ..., channel_axis: int)``;
3. ``import tensorrt_libs as tensorrt_libs``, a package that exists only beside real TensorRT.

A fourth slip mypy accepts silently: the module-level ``bool: DataType`` (``trt.bool``) shadows the
builtin in every annotation of its module, so each ``-> bool`` would read as an unknown type (Any).

This tool copies the installed stubs into a temporary folder, patches those slips (``in`` -> ``in_``;
``= ...`` defaults for the trailing parameters; the import dropped; ``builtins.bool`` in annotations),
marks the copy typed (``py.typed``) and runs mypy in strict mode with ``MYPYPATH`` pointing at the
copy, on the modules that call TensorRT (or the files given). Only those files are reported: errors
in imported modules are silenced (``follow_imports = silent``; for the stubs, which mypy reads
whatever that setting says, ``ignore_errors``), the rest of latentrt being checked by ``make lint``.
Never commit the stubs: they are installed, not vendored.

Usage: ``python tools/check_tensorrt_types.py [FILE ...]``. Exit status: mypy's (0 clean, 1 type
errors), 3 when tensorrt-stubs is not installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MODULES", "STUB_PACKAGES", "check", "main", "patch_stub", "stubs_root"]

REPO = Path(__file__).resolve().parent.parent
MODULES = (
    "latentrt/exporters/tensorrt.py",
    "latentrt/exporters/tensorrt_build.py",
    "latentrt/exporters/tensorrt_plan.py",
    "latentrt/exporters/tensorrt_refit.py",
    "latentrt/runtimes/tensorrt.py",
    "latentrt/runtimes/tensorrt_refit.py",
)
"""The modules that call TensorRT (or plan for it)."""
STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")
NOT_INSTALLED = 3
CONFIG = """\
[mypy]
python_version = 3.10
strict = True
warn_unused_ignores = True
follow_imports = silent
untyped_calls_exclude = safetensors

[mypy-tensorrt.*,tensorrt_bindings.*]
ignore_errors = True

[mypy-scipy.*,diffusers.*,k_diffusion.*,torchsde.*,onnxruntime.*]
ignore_missing_imports = True
"""

_KEYWORD_PARAMETER = re.compile(r"(?<=[(,])(\s*)in(?=\s*:)")
_BOOL = re.compile(r"(?<![\w.'\"])bool(?![\w'\"])")
_DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*(?:->.*)?:\s*)$")


def stubs_root() -> Path | None:
    """The folder holding the installed ``tensorrt/`` and ``tensorrt_bindings/`` stubs, or None."""
    try:
        distribution = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or ():
        if file.as_posix() == "tensorrt/__init__.pyi":
            return Path(str(distribution.locate_file(file))).parent.parent
    return None


def _split_parameters(text: str) -> list[str]:
    """Split a parameter list at its top-level commas (brackets and strings nest)."""
    parts, depth, start, quote = [], 0, 0, ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _defaults_after_defaults(line: str) -> str:
    """Give ``= ...`` to parameters that follow a defaulted one (slip 2); other lines unchanged."""
    match = _DEF.match(line)
    if match is None:
        return line
    head, parameters, tail = match.groups()
    parts, defaulted, changed = _split_parameters(parameters), False, False
    for i, part in enumerate(parts):
        name = part.strip()
        if name.startswith("*") or name == "/":
            break  # keyword-only or variadic parameters may follow defaults
        if "=" in name:
            defaulted = True
        elif defaulted and name:
            parts[i], changed = f"{part.rstrip()} = ...", True
    return f"{head}{','.join(parts)}{tail}" if changed else line


def patch_stub(text: str) -> str:
    """``text`` of a generated stub file with the three slips mypy rejects patched, and ``bool`` annotations
    pointed at the builtin (see the module docstring)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if line.strip() == "import tensorrt_libs as tensorrt_libs":
            continue  # slip 3
        if line.lstrip().startswith("def "):
            ending = line[len(line.rstrip("\r\n")) :]
            line = _defaults_after_defaults(_KEYWORD_PARAMETER.sub(r"\1in_", line.rstrip("\r\n"))) + ending
        if not line.startswith("bool:"):  # the module's own ``bool`` (a DataType) keeps its name
            line = _BOOL.sub("builtins.bool", line)
        lines.append(line)
    patched = "".join(lines).replace(", 'tensorrt_libs'", "")
    return patched.replace(
        "from __future__ import annotations\n", "from __future__ import annotations\nimport builtins\n", 1
    )


def _copy_patched(root: Path, target: Path) -> None:
    """Copy the stub packages from ``root`` into ``target``, patching every ``.pyi`` file."""
    for package in STUB_PACKAGES:
        for source in sorted((root / package).rglob("*.pyi")):
            destination = target / source.relative_to(root)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(patch_stub(source.read_text(encoding="utf-8")), encoding="utf-8")
        (target / package / "py.typed").write_text("", encoding="utf-8")


def check(files: Sequence[str], cache_dir: Path | None = None) -> tuple[int, str]:
    """Run mypy on ``files`` against patched stubs; mypy's exit status and output."""
    root = stubs_root()
    if root is None:
        return (
            NOT_INSTALLED,
            "tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs (make install does)",
        )
    with tempfile.TemporaryDirectory(prefix="latentrt-tensorrt-stubs-") as temp:
        stubs = Path(temp) / "stubs"
        _copy_patched(root, stubs)
        config = Path(temp) / "mypy.ini"
        config.write_text(CONFIG, encoding="utf-8")
        cache = cache_dir or REPO / ".mypy_cache" / "tensorrt-stubs"
        command = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(cache), *files]
        environment = {**os.environ, "MYPYPATH": os.pathsep.join([str(stubs), str(REPO)])}
        done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, check=False)
    return done.returncode, done.stdout + done.stderr


def main(argv: Sequence[str] | None = None) -> int:
    """Check the files in ``argv`` (default :data:`MODULES`) and print mypy's report."""
    files = list(argv if argv is not None else sys.argv[1:]) or list(MODULES)
    status, output = check(files)
    print(output, end="" if output.endswith("\n") else "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
