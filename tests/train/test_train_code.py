"""medclf/train/ stays readable: no function (or method) of its modules longer than 60 lines."""

import ast
import pathlib

import pytest

pytestmark = pytest.mark.timeout(60)
LIMIT = 60
TRAIN = pathlib.Path(__file__).parents[2] / "medclf" / "train"


def function_lengths(path: pathlib.Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_no_function_in_the_training_modules_is_longer_than_60_lines():
    lengths = {f"{path.name}:{name}": n for path in sorted(TRAIN.glob("*.py"))
               for name, n in function_lengths(path).items()}
    assert "loop.py:train_loop_per_worker" in lengths  # the measure sees the functions it is about
    too_long = {name: n for name, n in lengths.items() if n > LIMIT}
    assert not too_long, f"functions over {LIMIT} lines in medclf/train/: {too_long}"
