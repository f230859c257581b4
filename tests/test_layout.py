"""The package's layout keeps its promise: no module imports from a stage above its own, and what the batch
planner and the option declarations read loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "anp_onnx"
# bottom to top: a module may import from its own layer and the ones before it
LAYERS = (
    ("anp_onnx", "anp_onnx.errors", "anp_onnx.timing", "anp_onnx.prune", "anp_onnx.data"),
    ("anp_onnx.onnx",),
    ("anp_onnx.validate",),
    ("anp_onnx.bridge",),
    ("anp_onnx.methods",),
    ("anp_onnx.options", "anp_onnx.pipeline"),
    ("anp_onnx.report",),
    ("anp_onnx.batch",),
    ("anp_onnx.cli",),
)


def layer_of(module: str) -> int:
    """The layer of a dotted module name: the longest prefix listed in LAYERS."""
    best, rank = "", -1
    for position, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, position
    return rank


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> list[str]:
    """Every anp_onnx module `path` imports, also inside functions and TYPE_CHECKING blocks."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name == "anp_onnx" or name.startswith("anp_onnx.")]


MODULES = sorted(PACKAGE.rglob("*.py"))
FRONT_DOORS = {"anp_onnx": {"anp_onnx.pipeline.purify"}}  # `anp_onnx.purify`, loaded lazily for library users


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_no_module_imports_from_a_stage_above_its_own(path):
    own = layer_of(module_name(path))
    allowed = FRONT_DOORS.get(module_name(path), set())
    upward = [name for name in package_imports(path) if layer_of(name) > own and name not in allowed]
    assert not upward, f"{module_name(path)} (layer {own}) imports {upward}"


def test_every_module_belongs_to_a_layer():
    assert all(layer_of(module_name(path)) >= 0 for path in MODULES)


def test_the_batch_planner_and_the_option_declarations_load_no_torch():
    code = (
        "import sys; import anp_onnx.batch.manifest, anp_onnx.options, anp_onnx.methods.registry; "
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'onnx2torch')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
