"""The package layout is the pipeline: stages import only stages below them, and nothing imports in a circle.

A static scan of every `import` in `viseg/` (top-level, inside functions and under TYPE_CHECKING alike), so a
dependency that runs the wrong way fails here even when no test happens to execute the line that holds it.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "viseg"

# Lowest first. A module may import modules of its own layer and of the layers before it, never after it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("viseg.errors", "viseg.progress", "viseg.noise", "viseg.parallel", "viseg.io", "viseg.provenance")),
    ("data", ("viseg.data",)),
    ("planning", ("viseg.planning",)),
    # The schemas validate names against the registries below them (pathfinders, architectures) and the
    # scheduler registry beside them; `cli` is the Hydra boundary every layer above converts through.
    ("config", ("viseg.config", "viseg.schedulers", "viseg.cli", "viseg.resources")),
    ("preprocessing", ("viseg.preprocessing",)),
    ("inference", ("viseg.inference",)),
    ("evaluation", ("viseg.evaluation",)),
    ("training", ("viseg.training",)),
    ("sweep", ("viseg.sweep",)),
    ("commands", ("viseg.train", "viseg.plan", "viseg.verify", "viseg.predict", "viseg.evaluate", "viseg.demo",
                  "viseg.export_model", "viseg.sweep.__main__", "viseg.__main__")),
)
# Imported inside functions on purpose: these pull in torch, Lightning, Ray, Hydra, scipy, nibabel or
# matplotlib at import, and `--help` and config errors must not wait for them (see test_lazy_imports_only_...).
HEAVY = ("torch", "lightning", "ray", "hydra", "scipy", "nibabel", "matplotlib", "optuna", "mlflow", "wandb")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    if name == "viseg":
        return 0
    assert index is not None, f"{name} belongs to no layer: add it to LAYERS in {__file__}"
    return index


def _resolve(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The viseg modules an import statement loads (`from viseg.data import demo` loads viseg.data.demo)."""
    known = modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("viseg")]
    if not node.module or not node.module.startswith("viseg"):
        return []
    subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
    return subs or [node.module]


def imports(name: str, top_level_only: bool = False) -> list[tuple[str, int, bool]]:
    """(imported viseg module, line, whether at module level) for every import statement of `name`."""
    tree = modules()[name]
    found = []
    top = {id(n) for n in tree.body}
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += [(target, node.lineno, id(node) in top) for target in _resolve(node)]
    return found


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_stage_imports_a_stage_above_it() -> None:
    wrong = [f"{name}:{line} imports {target} ({LAYERS[layer_of(target)][0]} is above {LAYERS[layer_of(name)][0]})"
             for name in modules() for target, line, _ in imports(name) if layer_of(target) > layer_of(name)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = {name: {t for t, _, _ in imports(name) if t != name and t in modules()} for name in modules()}
    # A package's __init__ is loaded by each of its modules; they are empty here, so leave them out.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


@cache
def loads_heavy(name: str) -> bool:
    """Whether importing `name` loads a heavy library, directly or through viseg's module-level imports."""
    tree = modules()[name]
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in HEAVY for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in HEAVY and not node.level:
            return True
    return any(loads_heavy(t) for t, _, _ in imports(name, top_level_only=True) if t in modules() and t != name)


def test_lazy_imports_only_where_the_target_is_heavy() -> None:
    """viseg's own modules are imported at the top of each file; inside a function only when the module
    pulls in a heavy library, so that the light commands stay light."""
    needless = [f"{name}:{line} imports {target} inside a function; {target} is light: import it at the top"
                for name in modules() for target, line, top in imports(name)
                if not top and not _under_type_checking(name, line) and not loads_heavy(target)
                and name != "viseg.__main__"]  # the `viseg` dispatcher imports the one command asked for
    assert not needless, "\n".join(needless)


def _under_type_checking(name: str, line: int) -> bool:
    return any(isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test) and n.lineno <= line <= n.end_lineno
               for n in modules()[name].body)


def test_the_scan_catches_a_wrong_way_import_and_a_cycle() -> None:
    """The scan itself: an upward import and a circle between two modules, planted in the parsed tree."""
    planted = {"viseg.data.planted_up": "from viseg.sweep.driver import plan_sweep\n",
               "viseg.io.planted_a": "def f():\n    from viseg.io.planted_b import g\n",
               "viseg.io.planted_b": "from viseg.io.planted_a import f\n"}
    modules().update({name: ast.parse(code) for name, code in planted.items()})
    try:
        with pytest.raises(AssertionError, match=r"viseg\.data\.planted_up:1 imports viseg\.sweep\.driver"):
            test_no_stage_imports_a_stage_above_it()
        circle = re.escape("viseg.io.planted_a -> viseg.io.planted_b -> viseg.io.planted_a")
        with pytest.raises(pytest.fail.Exception, match=circle):
            test_no_import_cycle()
    finally:
        for name in planted:
            del modules()[name]


def test_the_wheel_lists_every_package_and_config_folder() -> None:
    """pyproject's package list is explicit (conf/ and sweeps/ map into viseg): a new stage package or config
    group folder that is missing from it would be left out of the wheel without an error."""
    import tomllib

    root = PACKAGE.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    code = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    data = {f"viseg.{top}" + "".join(f".{part}" for part in d.relative_to(root / top).parts)
            for top in ("conf", "sweeps") for d in [root / top, *(root / top).rglob("*")] if d.is_dir()}
    assert listed == code | {d for d in data if "__pycache__" not in d}
    assert setuptools["package-dir"] == {"viseg.conf": "conf", "viseg.sweeps": "sweeps"}
