# Two entry points for a fresh machine: `make demo` and `make test` (both create .venv if needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint docs results install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,serve,report,dev]'  # the core and the extras demo, test and lint use
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/pv2tea demo --out demo_out

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Lint, format and type checks (settings in pyproject.toml; .pre-commit-config.yaml runs the same on each commit).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy src

# The documentation site (mkdocs-material + mkdocstrings), built offline into site/; a broken link fails it.
$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

# The results page, generated from the result files in docs/results/ (tests/unit/test_results_page.py checks it is current).
results: $(VENV)/.installed
	$(PY) docs/hooks/results.py

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) demo_out .pytest_cache site
