"""docs/configuration.md, generated from the config schema (the medclf/config package), so it cannot go stale.

    python -m medclf.config_doc > docs/configuration.md     # regenerate
    python -m medclf.config_doc --check docs/configuration.md  # exit 1 when the file is out of date

Every key's type and default come from the pydantic models; its meaning from the docstring under the
field in medclf/config/ (the text a reader of the code sees), read with `ast` without importing anything else.
"""

from __future__ import annotations

import ast
import inspect
import sys
import typing

from pydantic import BaseModel

from medclf import config as config_mod

HEADER = """# Configuration reference

Generated from `medclf/config/` by `python -m medclf.config_doc`; do not edit by hand
(`tests/project/test_docs.py` fails when this file and the schema disagree).

A config is YAML with the sections below; every key is optional. `--set section.key=VALUE` overrides
one value on the command line (parsed as YAML). Unknown keys are errors, named with the file.
Secrets (the UID key, S3 credentials) never go in a config: they come from the environment.
"""


def field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} from the string literal after each annotated field."""
    import importlib
    import pkgutil

    parts = [importlib.import_module(f"medclf.config.{m.name}") for m in pkgutil.iter_modules(config_mod.__path__)]
    docs: dict[str, dict[str, str]] = {}
    for node in (n for part in parts for n in ast.parse(inspect.getsource(part)).body):
        if not isinstance(node, ast.ClassDef):
            continue
        found, body = {}, node.body
        for here, after in zip(body, body[1:] + [None]):
            if isinstance(here, ast.AnnAssign) and isinstance(here.target, ast.Name) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                found[here.target.id] = inspect.cleandoc(after.value.value)
        docs[node.name] = found
    return docs


def _type_name(annotation) -> str:
    text = repr(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace("NoneType", "None")


def _bounds(field) -> str:
    """Numeric limits the schema enforces (pydantic's ge/gt/le/lt), e.g. ` (>= 1)`."""
    marks = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = [f"{sign} {getattr(m, attr)}" for m in field.metadata for attr, sign in marks.items() if hasattr(m, attr)]
    return f" ({', '.join(found)})" if found else ""


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{value!r}`"
    return f"`{field.default!r}`"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def section(name: str, model: type[BaseModel], docs: dict, out: list[str]) -> None:
    out += ["", f"## `{name}`", ""]
    if model.__doc__ and model.__doc__ is not BaseModel.__doc__ and "__doc__" in model.__dict__:
        out += [_one_line(inspect.cleandoc(model.__doc__)), ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for key, field in model.model_fields.items():
        out.append(f"| `{name}.{key}` | `{_type_name(field.annotation)}`{_bounds(field)} | {_default(field)} | "
                   f"{_one_line(docs.get(model.__name__, {}).get(key, ''))} |")
        sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if sub is not None:
            nested.append((f"{name}.{key}", sub))
    for sub_name, sub in nested:
        section(sub_name, sub, docs, out)


def render() -> str:
    docs, out = field_docs(), [HEADER.rstrip()]
    for name, field in config_mod.Config.model_fields.items():
        section(name, field.annotation, docs, out)
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[:1] == ["--check"]:
        with open(argv[1], encoding="utf-8") as f:
            if f.read() != text:
                print(f"{argv[1]} is out of date: python -m medclf.config_doc > {argv[1]}", file=sys.stderr)
                return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
