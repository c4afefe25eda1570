"""The package's layers only look down, and the command's help imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm"

LAYERS = [("errors", "config", "allocator"), ("model", "text"), ("data",), ("grounding", "checkpoint"),
          ("deploy", "hub"), ("api",), ("eval",), ("train",), ("predict",), ("serve",), ("cli",)]
"""vlm's parts, lowest first. A module may import its own part and the parts of lower layers, never a part beside
it or above it. The code argues for this order: the model knows nothing of tokens or data; grounding turns a model's
attention into maps and checkpoint reads and writes a model, both below the API that combines them for inference
(deploy, between them, exports a model to ONNX and runs such an export on ONNX Runtime; hub, beside it, converts
Hugging Face captioners into a model);
evaluation scores a captioner (the API), training reuses evaluation's metrics for validation; prediction over a
collection (vlm predict) reuses training's Lightning progress; vlm serve and the command sit on top. The package
root (``vlm/__init__.py``) is the API."""

LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """The part of ``vlm.x.y`` (x) or of the package root (api)."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "api"


def _imports(path: Path) -> set[str]:
    """Every vlm module that the file imports, anywhere in it (also inside functions and TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vlm"}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: a relative import; vlm imports itself by absolute names")
        elif isinstance(node, ast.ImportFrom) and node.module == "vlm":
            # `from vlm import config` imports the submodule vlm.config; `from vlm import load`, the root.
            found |= {f"vlm.{a.name}" if _is_submodule(a.name) else "vlm" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "vlm":
            found.add(node.module)
    return found


def _is_submodule(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {_part(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")) for p in MODULES}
    assert parts <= set(LAYER), f"give these parts a layer in LAYERS: {sorted(parts - set(LAYER))}"


def test_no_module_imports_a_layer_above_or_beside_it():
    wrong = []
    for path in MODULES:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        part = _part(module)
        for imported in sorted(_imports(path)):
            other = _part(imported)
            if other != part and LAYER[other] >= LAYER[part]:
                wrong.append(f"{path.relative_to(ROOT)} ({part}) imports {imported} ({other})")
    assert not wrong, "imports that do not look down:\n" + "\n".join(wrong)


@pytest.mark.parametrize("argv", [["--help"], ["caption", "--help"]])
def test_help_imports_no_torch(argv):
    code = ("import sys\nfrom vlm.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'lightning', 'timm') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    *help_lines, imported = result.stdout.strip().splitlines()
    assert "usage: vlm" in help_lines[0] and len(help_lines) > 5
    assert imported == "[]"
