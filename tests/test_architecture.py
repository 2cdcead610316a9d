"""The house rules, checked: every module imports on its own, no import cycles (counting imports inside
functions), and no module imports from a layer above its own.

Layers, bottom up (a package may import its own modules and anything in a lower layer): core's errors,
progress, device; core's files, registry; models, data; calib; quant; export; plan; eval; recipe; toys,
recipe_reference; pipeline; cli and the package's lazy public API.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantlab"

# Layer of each top-level package or module of quantlab; a module may import only from its own layer's
# package or from strictly lower layers.
LAYERS: dict[str, int] = {
    "core.errors": 0, "core.progress": 0, "core.device": 0, "core.host_memory": 0, "core": 0,
    "core.files": 1, "core.registry": 1,
    "models": 2, "data": 2,
    "calib": 3,
    "quant": 4,
    "export": 5,
    "plan": 6,
    "eval": 7,
    "recipe": 8, "recipe_reference": 9, "toys": 9,
    "pipeline": 10,
    "cli": 11, "__init__": 11,
}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE).with_suffix("")
        name = ".".join(("quantlab", *rel.parts)).removesuffix(".__init__")
        out[name] = p
    return out


def imports_of(path: Path, name: str) -> set[str]:
    """Every quantlab module ``path`` imports, at top level or inside a function (``TYPE_CHECKING`` excluded)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are for annotations only
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    known = modules()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantlab"):
            for alias in node.names:  # `from quantlab.quant import billm` imports the module quantlab.quant.billm
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("quantlab"))
    return {f for f in found if f != name}


def layer_of(module: str) -> tuple[str, int]:
    """The unit a module belongs to (a top-level package, or a module of ``core``, whose modules are layered
    among themselves) and its layer."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top == "core" and len(parts) > 2:
        top = f"core.{parts[2]}"
    return top, LAYERS[top]


def _unit(module: str) -> str:
    parts = module.split(".")
    return f"core.{parts[2]}" if parts[1] == "core" and len(parts) > 2 else parts[1]


def graph() -> dict[str, set[str]]:
    return {name: imports_of(path, name) for name, path in modules().items()}


def test_every_module_has_a_layer():
    missing = sorted({m for m in modules() if m != "quantlab" and _unit(m) not in LAYERS})
    assert not missing, f"add these to LAYERS: {missing}"


def test_no_upward_imports():
    bad = []
    for mod, deps in graph().items():
        top, level = layer_of(mod)
        for dep in deps:
            dtop, dlevel = layer_of(dep)
            if dtop != top and dlevel >= level:
                bad.append(f"{mod} (layer {level}) imports {dep} (layer {dlevel})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d == m.rsplit(".", 1)[0] and m.startswith(d + "."):
                continue  # a module importing its own package's __init__ (re-exports) is not a cycle here
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{m} -> {d}")
            elif d in g and state.get(d) is None:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if state.get(m) is None:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_every_module_imports_in_a_fresh_interpreter():
    names = [m for m in modules() if not m.endswith("__main__")]
    code = ("import importlib, sys\nfailed = []\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        failed.append(f'{m}: {type(e).__name__}: {e}')\nprint('\\n'.join(failed))\n"
            "sys.exit(1 if failed else 0)")
    res = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


@pytest.mark.parametrize("module", ["quantlab.core.errors", "quantlab.core.files", "quantlab.quant.scheme"])
def test_bottom_layer_modules_import_alone(module):
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
