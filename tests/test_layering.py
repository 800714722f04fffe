"""The product's modules import downwards only, and the parsed flags stay in the command line.

Read with `ast` (nothing is imported or run), so these take well under a second. An import inside a
function counts like one at the top: a module that imports its caller "only when needed" is still a
circle a reader has to climb back up.

- No module imports one that imports it back (directly or through others).
- No library module imports the command line (`capsulenet.py`, `capsulenet-multi-gpu.py`): the
  model, the data and the loop are usable without it.
- No library module reads an `argparse.Namespace`: it does not import `argparse`, names no
  `Namespace` and takes no parameter called `args`; the command line hands it plain values.

Library modules are the `capsnet` package's and the top-level `capsulelayers.py` and `utils.py`; `bench/`,
`experiments/` and `tests/` are callers like the scripts and are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

CLI_MODULES = frozenset({"capsulenet", "capsulenet-multi-gpu"})


def project_modules(root: Path) -> dict[str, Path]:
    """The modules of `root` by the name they are imported as: its top-level `.py` files by stem, the
    `capsnet` package's by dotted name (`capsnet.layers`, `capsnet.distributed.flow`)."""
    modules = {path.stem: path for path in sorted(root.glob("*.py"))}
    for path in sorted((root / "capsnet").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(path: Path) -> set[str]:
    """Every module name an `import` in the file may load, wherever it stands (function bodies too):
    `import a.b` gives `a.b`; `from a import b` gives `a` and `a.b` (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each project module of `root` -> the project modules it imports. The package's `__init__`
    (`capsnet`) imports nothing itself (its names load on first use), so edges to it are left out."""
    modules = project_modules(root)
    return {name: {n for n in imported_names(path) if n in modules and n != "capsnet"}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as `[a, b, ..., a]`, or None when the graph has none (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for child in sorted(graph.get(node, ())):
            cycle = visit(child)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen: set[str] = set()
    stack = list(graph[start])
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(graph.get(node, ()))
    return seen


def flag_readers(source: str) -> list[str]:
    """Where `source` touches parsed flags: `argparse` imports, `Namespace`, parameters named `args`.

    `*args` (a function's extra positional arguments) is not a Namespace and is allowed.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            found.append(f"line {node.lineno}: import argparse")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            found.append(f"line {node.lineno}: from argparse import ...")
        elif isinstance(node, ast.Attribute) and node.attr == "Namespace":
            found.append(f"line {node.lineno}: .Namespace")
        elif isinstance(node, ast.Name) and node.id == "Namespace":
            found.append(f"line {node.lineno}: Namespace")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            found += [f"line {node.lineno}: parameter args" for p in params if p.arg == "args"]
    return found


# ---------------------------------------------------------------------------------------------
# The checks themselves can fail
# ---------------------------------------------------------------------------------------------


def test_a_circle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    (tmp_path / "cli.py").write_text("import model\n")
    (tmp_path / "model.py").write_text("import layers\n")
    (tmp_path / "layers.py").write_text("import numpy\n\n\ndef f():\n    import cli  # climbs back up\n")
    (tmp_path / "leaf.py").write_text("import layers\n")
    graph = import_graph(tmp_path)
    assert graph == {"cli": {"model"}, "model": {"layers"}, "layers": {"cli"}, "leaf": {"layers"}}
    assert find_cycle(graph) == ["cli", "model", "layers", "cli"]
    (tmp_path / "layers.py").write_text("import numpy\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_a_module_importing_itself_is_a_circle() -> None:
    assert find_cycle({"a": {"a"}, "b": set()}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no circle


def test_flag_readers_are_found() -> None:
    source = ("import argparse\nfrom argparse import Namespace\n\n\n"
              "def f(x, args: argparse.Namespace, *rest): ...\n\n\n"
              "def g(*args, **kwargs): ...\n")
    assert flag_readers(source) == ["line 1: import argparse", "line 2: from argparse import ...",
                                    "line 5: parameter args", "line 5: .Namespace"]
    assert flag_readers("def g(*args, **kwargs): return args\n") == []


# ---------------------------------------------------------------------------------------------
# The project
# ---------------------------------------------------------------------------------------------


def test_the_project_modules_are_all_seen() -> None:
    graph = import_graph(REPO_ROOT)
    # A few edges known from the files, so that an empty or broken graph cannot pass the checks below.
    assert {"capsnet.model", "capsnet.training", "capsnet.deploy", "capsnet.datasets"} <= graph["capsulenet"]
    assert "capsnet.model" in graph["capsnet.deploy"]
    assert "capsnet.image_folder" in graph["capsnet.datasets"]
    assert "capsnet.layers" in graph["capsulelayers"]
    assert "capsulenet" in graph["capsulenet-multi-gpu"]


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycle = find_cycle(import_graph(REPO_ROOT))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_library_modules_never_import_the_command_line() -> None:
    graph = import_graph(REPO_ROOT)
    climbing = {name: sorted(reachable(graph, name) & CLI_MODULES)
                for name in graph if name not in CLI_MODULES}
    assert {name: cli for name, cli in climbing.items() if cli} == {}


def test_no_library_module_reads_parsed_flags() -> None:
    found = {name: flag_readers(path.read_text(encoding="utf-8"))
             for name, path in project_modules(REPO_ROOT).items() if name not in CLI_MODULES}
    assert len(found) >= 20  # capsnet.layers, capsnet.training, ...: the library was found
    assert {name: lines for name, lines in found.items() if lines} == {}
