"""The capture layer's walls: it imports only the standard library, torch and the run format,
never the analysis, presentation or CLI layers, and its modules form no import cycle
(function-level imports included)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gradscope

PKG = Path(gradscope.__file__).parent
CAPTURE = PKG / "capture"
# What capture may import from gradscope besides itself: the run format and what it rests on.
ALLOWED_OUTSIDE = {"gradscope", "gradscope._version", "gradscope.rundir", "gradscope.errors", "gradscope.validate"}
HEAVY = ("pandas", "rich", "matplotlib", "yaml", "typer", "click")


def _imports(path: Path, package: str) -> list[str]:
    """Every module a file imports, at any depth (function bodies too), as absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append(base)
            # `from gradscope.capture import recorder` imports the submodule recorder
            out += [f"{base}.{a.name}" for a in node.names if (PKG.parent / (base + "." + a.name).replace(".", "/")).with_suffix(".py").exists()]
    return out


def _capture_modules() -> dict[str, Path]:
    return {f"gradscope.capture.{p.stem}": p for p in CAPTURE.glob("*.py") if p.stem != "__init__"}


def test_capture_has_an_init_stating_its_rule():
    init = CAPTURE / "__init__.py"
    assert init.exists()
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and "standard library" in doc and "torch" in doc


def test_capture_imports_nothing_above_it():
    bad = []
    for name, path in _capture_modules().items():
        for imp in _imports(path, "gradscope.capture"):
            if imp.startswith("gradscope") and not imp.startswith("gradscope.capture") and imp not in ALLOWED_OUTSIDE:
                bad.append(f"{name} imports {imp}")
            if imp.split(".")[0] in HEAVY:
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


def test_the_run_format_capture_uses_imports_no_analysis_at_module_level():
    # rundir's reading half may import pandas lazily, inside functions; at module level only stdlib.
    for mod in ("rundir", "errors", "validate", "_version"):
        tree = ast.parse((PKG / f"{mod}.py").read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    assert n.split(".")[0] not in HEAVY, f"{mod} imports {n} at module level"
                    if n.startswith("gradscope"):
                        assert n in ALLOWED_OUTSIDE, f"{mod} imports {n}"


def test_capture_modules_form_no_import_cycle():
    mods = _capture_modules()
    graph = {name: {i for i in _imports(path, "gradscope.capture") if i in mods and i != name}
             for name, path in mods.items()}
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(n, stack):
        seen[n] = 1
        for m in sorted(graph[n]):
            if seen.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in seen:
                visit(m, stack + [m])
        seen[n] = 2

    for n in sorted(graph):
        if n not in seen:
            visit(n, [n])
    assert not cycles, cycles


def test_importing_the_recorder_loads_nothing_heavy():
    code = ("import sys, gradscope.capture.recorder, gradscope.capture.api, gradscope.capture.boot; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "", f"capture loaded {p.stdout.strip()}"
