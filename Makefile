# The two commands: `make demo` (install + end-to-end run on phantoms) and `make test`.
# Both create the project-local virtual environment .venv when it is missing, and re-install
# only when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m medclf.cli demo --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean-runs:
	rm -rf runs
