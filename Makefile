# The two commands: `make demo` (install + end-to-end run on phantoms) and `make test`.
# Both create the project-local virtual environment .venv when it is missing, and re-install
# only when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test clean-runs system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m medclf.cli demo --config configs/demo.yaml

# System packages some tests need: Orthanc and its DICOMweb plugin (the PACS of tests/test_pacs.py).
# Installed only when missing, quietly; without apt-get (or root/sudo) it says so and the tests skip.
system-deps:
	@if command -v Orthanc >/dev/null 2>&1 && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	  S=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	  { $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq orthanc orthanc-dicomweb; } \
	    >/dev/null 2>&1 || echo "system-deps: could not install orthanc orthanc-dicomweb; the PACS tests will skip"; \
	else echo "system-deps: Orthanc missing and no apt-get with root; the PACS tests will skip"; fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

clean-runs:
	rm -rf runs
