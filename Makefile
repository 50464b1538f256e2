# The two commands: `make demo` (install + end-to-end run on phantoms) and `make test`.
# Both create the project-local virtual environment .venv when it is missing, and re-install
# only when pyproject.toml changed. `make shell` opens a shell with `medclf` on PATH.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.test-extras-stamp
# TORCH=cpu installs PyTorch's CPU-only wheels first (index below): no CUDA libraries (~3.2 GB of nvidia-*
# packages and ~0.9 GB of triton in a default install). Leave it empty on GPU machines: PyPI's torch wheel
# brings CUDA, which train.use_gpu / score.use_gpu need.
TORCH ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# `make demo` installs without the test extras; `make test` adds them.
EXTRAS ?=

.PHONY: install install-test demo test test-fast shell clean-runs system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
	@if [ "$(TORCH)" = "cpu" ]; then echo "installing CPU-only torch/torchvision from $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install --progress-bar on --index-url $(TORCH_CPU_INDEX) \
	    "$$(grep -o 'torch==[0-9.]*' pyproject.toml)" "$$(grep -o 'torchvision==[0-9.]*' pyproject.toml)"; fi
	$(PY) -m pip install --progress-bar on -e '.$(EXTRAS)'
	touch $(STAMP)

install: $(STAMP)

# The test extras (pytest, moto, pydicom-data, nbclient...), on top of the install.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --progress-bar on -e '.[test]'
	touch $(TEST_STAMP)

install-test: $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m medclf.cli demo --config configs/demo.yaml
	@echo "next: put medclf on PATH with 'source $(VENV)/bin/activate' (or 'make shell'), then 'medclf --help'"

# System packages some tests need: Orthanc and its DICOMweb plugin (the PACS of tests/score/test_pacs.py), and
# Chromium (the headless browser of tests/report/test_report_browser.py).
# Installed only when missing, quietly; without apt-get (or root/sudo) it says so and the tests skip.
system-deps:
	@if command -v Orthanc >/dev/null 2>&1 && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	  S=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	  { $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq orthanc orthanc-dicomweb; } \
	    >/dev/null 2>&1 || echo "system-deps: could not install orthanc orthanc-dicomweb; the PACS tests will skip"; \
	else echo "system-deps: Orthanc missing and no apt-get with root; the PACS tests will skip"; fi
	@# Chromium: tests/report/test_report_browser.py renders the HTML reports in it (headless), the same way.
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	  S=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	  { $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq chromium; } \
	    >/dev/null 2>&1 || echo "system-deps: could not install chromium; the browser tests of the reports will skip"; \
	else echo "system-deps: Chromium missing and no apt-get with root; the browser tests of the reports will skip"; fi

test: install-test system-deps
	$(PY) -m pytest -q --durations=10

# The inner loop: every test that starts no Ray (tests that start Ray carry the `ray` marker).
test-fast: install-test
	$(PY) -m pytest -q -m "not ray"

shell: $(STAMP)
	@echo "medclf is on PATH in this shell (from $(VENV)/bin/activate); 'exit' to leave"
	@bash --rcfile <(echo ". ~/.bashrc 2>/dev/null; . $(VENV)/bin/activate") -i

clean-runs:
	rm -rf runs
