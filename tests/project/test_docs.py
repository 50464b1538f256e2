"""The docs cannot go stale (issue 36, item 2), without Ray:
- the README's module map is generated here from each part's docstring and must match;
- docs/configuration.md is what `python -m medclf.config_doc` renders from the schema;
- docs/results.md is what docs/results.py renders from docs/results.csv, and every figure in the
  README's results table is a row of that CSV (value and CI);
- every `medclf ...` command in the README parses with the real CLI, its --set keys are config keys
  and its config files exist;
- pyproject's pointers (readme, DEVELOPERS.md) name files that exist.

The README examples are *run* by the suite's own tests of the same command lines (listed in
RUN_BY): this file checks they are the commands the CLI accepts.
"""

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")

# README command -> the tests that run that command line end to end.
RUN_BY = {
    "train": "tests/project/test_cluster_jobs.py (jobs/train.py as a Ray job), tests/train/test_training.py",
    "score": "tests/score/test_score_inputs.py, tests/report/test_gradcam.py::main(['score', ...]), "
             "tests/monitor/test_drift.py",
    "evaluate": "tests/report/test_evaluate.py (main(['evaluate', ...]))",
    "drift": "tests/monitor/test_drift.py (run_command('drift', ...))",
    "serve": "tests/score/test_serve.py",
    "export": "tests/model/test_export.py",
}


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _first_line(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def module_map() -> str:
    """One line per subpackage of medclf: its __init__ docstring's first paragraph."""
    pkg = os.path.join(ROOT, "medclf")
    lines = []
    for name in sorted(os.listdir(pkg)):
        init = os.path.join(pkg, name, "__init__.py")
        if os.path.isfile(init):
            doc = ast.get_docstring(ast.parse(open(init, encoding="utf-8").read()))
            assert doc, f"medclf/{name}/__init__.py has no docstring: the module map needs one line"
            lines.append(f"medclf/{name:<10}{_first_line(doc)}")
    return "\n".join(lines)


def test_readme_module_map_is_generated_from_the_docstrings():
    text = _read("README.md")
    block = re.search(r"<!-- module-map[^>]*-->\n```\n(.*?)\n```\n<!-- /module-map -->", text, re.S)
    assert block, "README.md has no module-map block"
    expected = module_map()
    assert block.group(1) == expected, f"README's module map is stale; replace its block with:\n{expected}"


def test_configuration_reference_is_up_to_date():
    from medclf.config_doc import render

    assert _read("docs/configuration.md") == render(), \
        "docs/configuration.md is stale: python -m medclf.config_doc > docs/configuration.md"
    for key in ("`score.extensions`", "`train.epochs`", "`train.augment.hflip`", "`drift.alpha`"):
        assert key in render()


def test_config_doc_check_mode_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n")
    out = subprocess.run([sys.executable, "-m", "medclf.config_doc", "--check", str(stale)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 1 and "out of date" in out.stderr


def test_results_page_is_generated_from_the_csv():
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        results = importlib.import_module("results")
    finally:
        sys.path.pop(0)
    rows = results.read_rows()
    assert _read("docs/results.md") == results.render(rows), "docs/results.md is stale: python docs/results.py"
    # the README's table: each row's figure and CI are a row of the CSV for that config
    table = [line for line in _read("README.md").split("## Results")[1].split("\n## ")[0].splitlines()
             if line.startswith("| `")]
    assert len(table) >= 5
    for line in table:
        config, figure, data = [c.strip() for c in line.strip("|").split("|")]
        assert len(line) < 160, f"README results cell too long: {line}"
        match = [r for r in rows if r["config"].endswith(config.strip("`")) and r["value"] in figure
                 and (r["ci95"] in figure or r["ci95"] == "not reported")]
        assert match, f"README results row not in docs/results.csv: {line}"


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", _read("README.md"), re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("medclf "):
                commands.append(shlex.split(line.replace("<", "").replace(">", "")))
    return commands


def test_readme_commands_parse_with_the_real_cli(tmp_path):
    from medclf.cli import COMMANDS
    from medclf.config import load_config

    commands = readme_commands()
    seen = {argv[1] for argv in commands}
    assert set(RUN_BY) <= seen, f"README lacks an example for {set(RUN_BY) - seen}"
    for name, tests in RUN_BY.items():  # the tests said to run each example exist
        for path in re.findall(r"tests/[\w/]+\.py", tests):
            assert os.path.exists(os.path.join(ROOT, path)), f"{name}: {path} is missing"
    for argv in commands:
        name, rest = argv[1], argv[2:]
        assert name in COMMANDS, argv
        args = COMMANDS[name][0](f"medclf {name}").parse_args(rest)  # SystemExit on an unknown option
        config = getattr(args, "config", None)
        if config:
            assert os.path.exists(os.path.join(ROOT, config)) or os.path.isabs(config), config
            load_config(os.path.join(ROOT, config) if not os.path.isabs(config) else config,
                        list(args.overrides))  # ConfigError on an unknown key or bad value


def test_pyproject_points_to_files_that_exist():
    text = _read("pyproject.toml")
    for name in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text) + re.findall(r'readme = "([^"]+)"', text):
        assert os.path.exists(os.path.join(ROOT, name)), f"pyproject.toml points to {name}, which is missing"
    assert "DEVELOPERS.md" in text or os.path.exists(os.path.join(ROOT, "DEVELOPERS.md"))


def test_docs_links_resolve():
    for page in ("README.md", "docs/usage.md", "docs/results.md", "DEVELOPERS.md", "docs/logging.md"):
        text = _read(page)
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" in target:
                continue
            assert os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)), f"{page}: dead link {target}"
