"""The package's import graph, read from the source (every `import` statement, those inside functions included: a
lazy import hides a loop from Python but not from a reader): no module of `hf_efficient` imports itself back through
others, and the models never import the application layer (the `hf-efficient` command and its data code)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The application layer: the command (`python -m hf_efficient` too) and what only it uses. Everything else (models,
# hub, the package's `__init__`) must import without it.
APPLICATION = (
    "hf_efficient.cli",
    "hf_efficient.__main__",
    "hf_efficient.data",
    "hf_efficient.seq2seq_data",
    "hf_efficient.errors",
)


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` under `root` (a package is its `__init__.py`)."""
    modules = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports. `from X import name` counts as importing `X.name` where that
    is a module, else `X`; a name that is no module is read as the closest package above it."""
    modules = module_files(root, package)
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # what `from .` refers to
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    imported.add(target)
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of `graph` as [a, b, ..., a], or None (depth-first search)."""
    state, path = {}, []  # state: 1 = on the current path, 2 = done

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_loop():
    graph = import_graph(REPO, "hf_efficient")
    assert {"hf_efficient.cli", "hf_efficient.cli.train", "hf_efficient.models.gmlp"} <= set(graph)
    assert "hf_efficient.cli.arguments" in graph["hf_efficient.cli.train"]  # the graph sees relative imports
    cycle = find_cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_the_models_do_not_import_the_application_layer():
    graph = import_graph(REPO, "hf_efficient")
    for module, imported in graph.items():
        if not module.startswith(APPLICATION):
            wrong = sorted(m for m in imported if m.startswith(APPLICATION))
            assert not wrong, f"{module} imports the application layer: {wrong}"


def test_a_loop_through_a_lazy_import_is_found(tmp_path):
    """The check itself: the loop the command once had (the CLI imported the runner inside a function, the runner
    imported the CLI's argument classes) is reported, and removing one side of it clears it."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("def run():\n    from . import training\n    training.go()\n")
    (package / "training.py").write_text("from .cli import run\n\ndef go():\n    pass\n")
    (package / "other.py").write_text("import pkg.training\n")
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle in (["pkg.cli", "pkg.training", "pkg.cli"], ["pkg.training", "pkg.cli", "pkg.training"])
    (package / "training.py").write_text("def go():\n    pass\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
