"""The layout shows the design: no import circle between the project's modules (counting imports inside functions
too, which would otherwise hide one), no test helper in the installed packages, one definition of the transition
names. Imports under `if TYPE_CHECKING:` and in `if __name__ == "__main__":` blocks are left out (they do not run
when the module is imported)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("policy", "actors", "rewards", "learner", "cluster", "worlds", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _skipped(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` and `if __name__ == "__main__":` blocks."""
    if not isinstance(node, ast.If):
        return False
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or "__main__" in test


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _skipped(child):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                out.add(prefix)
                out.update(f"{prefix}.{a.name}" for a in child.names)   # `from pkg import submodule`
            visit(child)
    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        # an import of a module runs its packages' __init__ first anyway: an edge to one's own package is no circle
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {m for m in found if m in files and m != name and m not in ancestors}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_circle_between_modules():
    graph = import_graph()
    assert len(graph) > 50                        # the walk found the project's modules
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .b import x\nif __name__ == '__main__':\n    import c\n")
    assert _imports(tree, "pkg.a", False) == {"pkg.b", "pkg.b.x"}


def test_no_test_helper_in_the_installed_packages():
    names = {p.stem for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert not names & {"testing", "tiny"}


def test_transition_names_are_defined_once():
    from algorithm.transitions import TRANSITION_NAMES, TRANSITIONS
    assert tuple(TRANSITIONS.names()) == tuple(sorted(TRANSITION_NAMES))    # the registry is the one list
