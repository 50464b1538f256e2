"""`make test-fast` (-m "not ray") starts no Ray (issue 36, item 7): tests reaching Ray through the
session fixtures are marked by conftest; a test file that starts Ray by itself (ray.init, init_ray,
a job subprocess) must say `ray` in its own markers. Checked on the source, without Ray."""

import ast
import os

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, above tests/project/
STARTS_RAY = ("ray.init(", "init_ray(", "\"ray\", \"start\"", "ray start ")


def _marked_ray(decorators) -> bool:
    return any("mark.ray" in ast.unparse(d) for d in decorators)


def test_tests_that_start_ray_themselves_carry_the_marker():
    unmarked = []
    paths = sorted(os.path.relpath(os.path.join(d, f), TESTS) for d, _, fs in os.walk(TESTS) for f in fs)
    for name in paths:  # tests/<folder>/test_*.py, relative to tests/
        base = os.path.basename(name)
        if not (base.startswith("test_") and base.endswith(".py")) or base == "test_markers.py":
            continue
        source = open(os.path.join(TESTS, name), encoding="utf-8").read()
        tree = ast.parse(source)
        module_marked = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                            and "mark.ray" in ast.unparse(n.value) for n in tree.body)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                body = ast.unparse(node)
                if any(s in body for s in STARTS_RAY) and not (module_marked or _marked_ray(node.decorator_list)):
                    unmarked.append(f"{name}::{node.name}")
    assert not unmarked, f"tests that start Ray without @pytest.mark.ray: {unmarked}"


def test_fixture_users_are_marked_at_collection(request):
    """This very session: every collected test that uses the session Ray carries the marker."""
    session = request.session
    offenders = [i.nodeid for i in session.items
                 if "ray_cluster" in getattr(i, "fixturenames", ()) and i.get_closest_marker("ray") is None]
    assert not offenders
    if not any("ray_cluster" in getattr(i, "fixturenames", ()) for i in session.items):
        pytest.skip("no Ray test collected in this run (nothing to check)")
