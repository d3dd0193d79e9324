"""The product modules (the *.py files at the repository root) form layers that only point down: no module
imports, directly or through others, a module that imports it back. Imports inside functions count too, since
hiding an import in a function only delays the cycle to run time."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def product_modules():
    return {path.stem: path for path in sorted(ROOT.glob("*.py"))}


def imported_modules(path, known):
    """The names in `known` that `path` imports anywhere: `import x`, `import x as y`, `from x import ...`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(names & known - {path.stem})


def import_graph():
    modules = product_modules()
    return {name: imported_modules(path, set(modules)) for name, path in modules.items()}


def find_cycles(graph):
    """Every elementary cycle, as (a, b, ..., a) starting at its alphabetically first module. A depth-first
    search from each module that only steps to modules after it finds each cycle exactly once."""
    cycles = []

    def visit(path):
        for nxt in graph[path[-1]]:
            if nxt == path[0]:
                cycles.append(tuple(path + [nxt]))
            elif nxt > path[0] and nxt not in path:
                visit(path + [nxt])

    for start in sorted(graph):
        visit([start])
    return sorted(cycles, key=lambda c: (len(c), c))


def test_cycle_finder_reports_each_cycle_once():
    graph = {"a": ["b"], "b": ["c", "a"], "c": ["a"], "d": ["a"]}
    assert find_cycles(graph) == [("a", "b", "a"), ("a", "b", "c", "a")]
    assert find_cycles({"x": ["y"], "y": []}) == []


def test_product_modules_import_without_cycles():
    graph = import_graph()
    assert {"model", "loading", "lora", "checkpoint"} <= set(graph)  # the scan sees the product modules
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among product modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_model_knows_only_the_architectures():
    """model.py sits below loading.py and lora.py: it may use the file formats, never the modules above it."""
    assert set(import_graph()["model"]) <= {"checkpoint", "report"}


def test_data_reads_datasets_without_the_experiment():
    """data.py (readers, data root, fetch) sits under design.py (split, placebo, confounds): it imports no model,
    tokenizer or statistics code."""
    graph = import_graph()
    assert set(graph["data"]) <= {"report"}
    assert "data" in graph["design"]
