"""Import structure of util: no import cycle anywhere (lazy imports inside functions included), no import of
a top-level module, and a leaf under every image reader, so the cache reader, its builder and util.data never
import each other in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_MODULES = {"image_io", "image_cache", "image_cache_builder", "data", "datasets", "label_layouts", "splits",
                "finetune_transforms", "samplers"}


def util_import_graph() -> dict[str, set[str]]:
    """util module -> the util modules it imports anywhere in its source (top level or in functions)."""
    mods = {p.stem for p in (ROOT / "util").glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for m in mods:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((ROOT / "util" / f"{m}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "util":
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("util."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("util.")}
        graph[m] = deps - {m}
    return graph


def cycles_through(graph: dict[str, set[str]], start: str) -> list[list[str]]:
    """Every simple import cycle that starts and ends at `start`."""
    found: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep == start:
                found.append(path + [start])
            elif dep not in path:
                walk(dep, path + [dep])
    walk(start, [start])
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles_through(graph, "a") == [["a", "b", "c", "a"]]
    assert cycles_through(graph, "d") == []


def test_data_modules_import_no_cycle():
    graph = util_import_graph()
    assert DATA_MODULES <= set(graph), DATA_MODULES - set(graph)
    for m in sorted(DATA_MODULES):
        assert cycles_through(graph, m) == [], m


def test_image_io_is_a_leaf_and_the_cache_reader_needs_no_util_data():
    graph = util_import_graph()
    assert graph["image_io"] <= {"cli"}, graph["image_io"]
    assert "data" not in graph["image_cache"] and "data" not in graph["image_cache_builder"]
    assert "image_cache_builder" not in graph["image_cache"]  # the reader never pulls in the builder


def test_no_util_module_is_in_an_import_cycle():
    graph = util_import_graph()
    assert {m: cycles_through(graph, m) for m in sorted(graph) if cycles_through(graph, m)} == {}


def test_util_imports_no_top_level_module():
    """Imports run main_* -> engine_* -> models_* -> util: util never reaches back up."""
    top = {p.stem for p in ROOT.glob("*.py")}
    offenders = []
    for path in sorted((ROOT / "util").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in top]
    assert offenders == []
