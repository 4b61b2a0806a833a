# Entry points. `make run`: set up and run the embedded default; `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
CORES ?= all
# Test processes (pytest-xdist): the tests' own workflow runs use 2 cores each, so 2 suits a 2-core machine.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast bench report clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --profile workflow/profiles/local

report: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --profile workflow/profiles/local --report results/report.html

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadscope

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadscope

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_capture.py

clean:
	rm -rf results .snakemake
