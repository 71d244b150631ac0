"""The dependency rule (docs/design.md, "Layers"), read from the source with `ast`: every import counts, at module
level, inside a function or under `TYPE_CHECKING`, relative or absolute."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import epee_core

ROOT = Path(__file__).resolve().parents[1]
# The one declaration of the order: a package imports only packages above it here.
LAYERS = ("engine", "serving", "data", "evaluation", "training", "calibration", "ops", "measure", "cli")
FORBIDDEN = (
    "handlers",
    "ts",
    "kserve",
    "locust",
    "load_tests",
)  # TorchServe loads our handlers; Locust runs on its own; KServe only through the platform package
# The platform packages (thin layers over epee_core's public API) and the one module that may import each.
PLATFORMS = {"handlers": None, "kserve_server": "epee_core.cli.modelserver"}  # TorchServe imports handlers


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """Absolute names of what `source` (the text of `module`) imports: `from X import name` counts as X.name
    when that is one of `modules`, else as X."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.update(
                f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names
            )
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the modules of `package` and the outside top-level names it imports."""
    files = {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        names = imports_of(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", set(files))
        inside = {name for name in names if name in files}
        outside = {name.split(".")[0] for name in names if name.split(".")[0] != package}
        graph[module] = inside | outside
    return graph


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...]) -> list[str]:
    """One line per import of a package that comes after the importer in `layers`. A sub-package must not
    import the top-level public API either: it maps onto engine and serving."""
    problems = []
    for module, targets in sorted(graph.items()):
        source = layer_of(module)
        if source is None:
            continue  # the top-level public API
        if source not in layers:
            problems.append(f"{module}: package '{source}' is not in the layer list")
            continue
        for target in sorted(targets):
            if target not in graph:
                continue
            destination = layer_of(target)
            if destination is None:
                problems.append(f"{module} imports the top-level {target}: import the defining module")
            elif destination != source and (
                destination not in layers or layers.index(destination) > layers.index(source)
            ):
                problems.append(
                    f"{module} ({source}) imports {target} ({destination}), which is not above it"
                )
    return problems


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {name}"
        for module, names in sorted(graph.items())
        for name in FORBIDDEN
        if name in names
    ]


def cycles(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """Import cycles among the modules under `prefix` (depth-first search, each cycle once)."""
    inside = {
        module: {target for target in targets if target.startswith(prefix)}
        for module, targets in graph.items()
        if module.startswith(prefix)
    }
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(inside.get(module, ())):
            if target in path:
                cycle = path[path.index(target) :]
                if not any(set(cycle) == set(known) for known in found):
                    found.append(cycle)
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in sorted(inside):
        visit(module, [module])
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, "epee_core")


def test_every_sub_package_is_a_layer(graph):
    assert {layer_of(module) for module in graph} - {None} == set(LAYERS)


def test_no_package_imports_one_below_it(graph):
    assert upward_imports(graph, LAYERS) == []


def test_epee_core_never_imports_handlers_torchserve_or_locust(graph):
    assert forbidden_imports(graph) == []


def test_engine_modules_import_each_other_without_cycles(graph):
    assert cycles(graph, "epee_core.engine") == []


def test_only_the_serve_command_imports_the_kserve_platform(graph):
    importers = sorted(module for module, targets in graph.items() if "kserve_server" in targets)
    assert importers == [PLATFORMS["kserve_server"]]


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_platform_packages_use_only_the_public_api(platform):
    for path in sorted((ROOT / platform).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deep = [alias.name for alias in node.names if alias.name.startswith("epee_core.")]
                assert not deep, f"{path.name} imports {deep}: use `from epee_core import ...`"
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("epee_core"):
                assert node.module == "epee_core", f"{path.name} imports {node.module}"
                private = [alias.name for alias in node.names if alias.name not in epee_core.__all__]
                assert not private, f"{path.name} imports {private}, which epee_core.__all__ does not export"
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "epee_core"
            ):
                assert node.attr in [*epee_core.__all__, "__file__"], (
                    f"{path.name} uses epee_core.{node.attr}"
                )


def test_design_doc_lists_the_layers_in_order():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    assert tuple(re.findall(r"^\| `(\w+)/` \|", section, re.MULTILINE)) == LAYERS


def test_package_docstring_lists_the_layers_in_order():
    assert tuple(re.findall(r"^- `(\w+)`:", epee_core.__doc__, re.MULTILINE)) == LAYERS


# --- the checks can fail ---------------------------------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")


def test_an_upward_import_inside_a_function_is_caught(tmp_path):
    write_package(tmp_path, {
        "epee_core/__init__.py": "",
        "epee_core/engine/__init__.py": "",
        "epee_core/engine/runner.py": "def run():\n    from ..serving.config import ServeConfig\n",
        "epee_core/serving/__init__.py": "",
        "epee_core/serving/config.py": "from ..engine import runner\n",
    })  # fmt: skip
    problems = upward_imports(import_graph(tmp_path, "epee_core"), LAYERS)
    assert problems == [
        "epee_core.engine.runner (engine) imports epee_core.serving.config (serving), which is not above it"
    ]


def test_an_absolute_import_under_type_checking_is_caught(tmp_path):
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import epee_core.cli.main\n"
    write_package(tmp_path, {
        "epee_core/__init__.py": "",
        "epee_core/data/__init__.py": source,
        "epee_core/cli/__init__.py": "",
        "epee_core/cli/main.py": "",
    })  # fmt: skip
    assert len(upward_imports(import_graph(tmp_path, "epee_core"), LAYERS)) == 1


def test_a_locust_import_and_an_engine_cycle_are_caught(tmp_path):
    write_package(tmp_path, {
        "epee_core/__init__.py": "",
        "epee_core/engine/__init__.py": "",
        "epee_core/engine/gate.py": "from . import policies\n",
        "epee_core/engine/policies.py": "def rule():\n    from .gate import ExitGate\n",
        "epee_core/measure/__init__.py": "import locust\n",
    })  # fmt: skip
    graph = import_graph(tmp_path, "epee_core")
    assert forbidden_imports(graph) == ["epee_core.measure imports locust"]
    assert cycles(graph, "epee_core.engine") == [["epee_core.engine.gate", "epee_core.engine.policies"]]
