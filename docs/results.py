"""docs/results.md from docs/results.csv: one row per measured config (figure, 95% CI, what data,
command, date, commit). Add a measurement to the CSV, then `python docs/results.py`; the test suite
(tests/project/test_docs.py) fails when results.md and the CSV disagree."""

import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["config", "figure", "value", "ci95", "data", "command", "date", "commit"]

HEADER = """# Results

Generated from `docs/results.csv` by `python docs/results.py`; do not edit by hand.

Every figure names the data it was measured on. Validation carved from a training archive is **not**
a result on a new site: where an independent test exists (the held-back Kermany test), it came out
far lower than validation. The day-by-day record of how these were reached is
[docs/archive/benchmarks.md](archive/benchmarks.md).

| config | figure | value | 95% CI | data | command | date | commit |
|---|---|---|---|---|---|---|---|
"""


def read_rows(path: str = os.path.join(HERE, "results.csv")) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows, start=2):
        missing = [c for c in COLUMNS if not (row.get(c) or "").strip()]
        if missing:
            raise ValueError(f"{path} line {i}: empty {', '.join(missing)} (every figure needs its CI, data and command)")
    return rows


def render(rows: list[dict]) -> str:
    cell = lambda v: v.replace("|", "\\|")  # noqa: E731
    lines = [f"| `{r['config']}` | {cell(r['figure'])} | {r['value']} | {r['ci95']} | {cell(r['data'])} | "
             f"`{cell(r['command'])}` | {r['date']} | {r['commit']} |" for r in rows]
    return HEADER + "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = os.path.join(HERE, "results.md")
    text = render(read_rows())
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if open(out, encoding="utf-8").read() == text else 1)
    open(out, "w", encoding="utf-8").write(text)
    print(f"wrote {out}")
