"""The import graph of vlchat's modules: no cycles, and the dependency direction ARCHITECTURE.md sets
(model <- chat <- serve; serve never imports train; model imports neither chat nor serve).

Every `import` and `from ... import` counts, at module level and inside functions alike: a
function-level import only postpones a cycle to the first call. The graph is read with `ast`
(nothing is imported), relative imports are resolved, and `from package import module` is an
edge to that module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "vlchat"


def module_name(path: Path, root: Path = REPO) -> str:
    """vlchat/chat/generate.py -> "vlchat.chat.generate"; vlchat/chat/__init__.py -> "vlchat.chat"."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from X import ...` reads from; `from . import a` in vlchat/chat/x.py -> vlchat.chat."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The known modules that `source` (the text of `module`) imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_base(node, module, is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {name for name in found if name in known}


def import_graph(package: Path = PACKAGE, root: Path = REPO) -> dict[str, set[str]]:
    """module name -> the package's modules it imports."""
    files = {module_name(path, root): path for path in sorted(package.rglob("*.py"))}
    known = set(files)
    return {
        name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The graph's cycles: each strongly connected component of more than one node, and each node
    that imports itself, as a sorted list (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def edges_between(graph: Mapping[str, set[str]], source: str, target: str) -> list[str]:
    """ "a -> b" for each import from a module under `source` of a module under `target` (dotted prefixes)."""

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    return sorted(
        f"{a} -> {b}" for a, targets in graph.items() if under(a, source) for b in targets if under(b, target)
    )


# --- the finder itself, on made-up graphs ---------------------------------------------------------


def test_cycles_finds_loops_and_self_imports_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_of_counts_function_level_relative_and_submodule_imports():
    known = {"pkg", "pkg.sub", "pkg.sub.a", "pkg.sub.b", "pkg.other"}
    source = "import os\nfrom . import b\ndef late():\n    from ..other import thing\n    import pkg.sub\n"
    assert imports_of(source, "pkg.sub.a", False, known) == {"pkg.sub.b", "pkg.other", "pkg.sub"}
    assert imports_of("from .a import x", "pkg.sub", True, known) == {"pkg.sub.a"}


# --- vlchat's own graph --------------------------------------------------------------------------


def test_the_graph_sees_vlchat_modules():
    graph = import_graph()
    assert "vlchat.chat.engine" in graph["vlchat.cli"]
    assert "vlchat.model.language" in graph["vlchat.chat.generate"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among vlchat modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_serve_never_imports_train():
    assert edges_between(import_graph(), "vlchat.serve", "vlchat.train") == []


def test_model_imports_neither_chat_nor_serve():
    graph = import_graph()
    assert (
        edges_between(graph, "vlchat.model", "vlchat.chat") + edges_between(graph, "vlchat.model", "vlchat.serve") == []
    )
