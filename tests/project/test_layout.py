"""The package's import structure (issue 36): no import circle between modules, and the subpackages
stand in layers, none importing one that imports it back, directly or round a longer loop. Imports
inside functions count: they are read from the source, not from a running interpreter. And the tests
mirror the package: each test file in tests/<subpackage>/ or tests/project/ (tests/README.md)."""

import ast
import pathlib

import pytest

pytestmark = pytest.mark.timeout(60)
ROOT = pathlib.Path(__file__).parents[2]


def import_graph() -> dict[str, set[str]]:
    """medclf module -> the medclf modules it imports (`from medclf import storage` names the module)."""
    modules = {}
    for path in (ROOT / "medclf").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medclf"):
                found = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {m for m in found if m in modules and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while not part or part[-1] != v:
                part.append(stack.pop())
                on.discard(part[-1])
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_of(module: str) -> str:
    """medclf.imaging.stage -> medclf.imaging; a top-level module (medclf.config) is its own layer."""
    return ".".join(module.split(".")[:2])


def test_no_import_circle_between_modules():
    assert circles(import_graph()) == []


def test_subpackages_stand_in_layers():
    packages: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        packages.setdefault(package_of(module), set()).update(
            package_of(m) for m in imported if package_of(m) != package_of(module))
    assert "medclf.imaging" in packages and "medclf.monitor" in packages["medclf.score"]  # the graph is read
    assert circles(packages) == [], "subpackages that import each other, directly or round a loop"


TESTS = ROOT / "tests"
PROJECT_FOLDER = "project"  # tests of the top-level modules (cli, config...) and of the project as a whole


def test_test_files_mirror_the_package():
    """Every tests/**/test_*.py sits in tests/<subpackage of medclf>/ or tests/project/, never at the top or
    deeper; every such folder has an __init__.py and a line in tests/README.md (the rule is written there)."""
    subpackages = {p.parent.name for p in (ROOT / "medclf").glob("*/__init__.py")}
    allowed = subpackages | {PROJECT_FOLDER}
    misplaced = [str(p.relative_to(ROOT)) for p in sorted(TESTS.rglob("test_*.py"))
                 if "__pycache__" not in p.parts
                 and (len(p.relative_to(TESTS).parts) != 2 or p.relative_to(TESTS).parts[0] not in allowed)]
    assert not misplaced, f"test files outside tests/<{'|'.join(sorted(allowed))}>/: {misplaced}"
    folders = sorted(p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert set(folders) <= allowed, f"folders under tests/ that match no medclf subpackage: {set(folders) - allowed}"
    assert (TESTS / "__init__.py").is_file(), "tests/__init__.py is missing"
    readme = (TESTS / "README.md").read_text()
    for name in folders:
        assert (TESTS / name / "__init__.py").is_file(), f"tests/{name}/__init__.py is missing"
        assert f"- `{name}/`" in readme, f"tests/README.md has no line for tests/{name}/"
