# Every target sets itself up on a fresh machine that has python3 >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench typecheck fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

typecheck: $(STAMP)
	$(BIN)/python -m mypy streamfold worker producer

# The peers' packages pin versions of their own (litellm caps openai below 3), so benchmarks get a
# virtualenv of their own and the test environment stays as the test extra says.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/assembler.py

# Coverage-guided fuzzing of every worker decode path (fuzz/worker_inputs.py), FUZZ_SECONDS per target.
FUZZ_VENV ?= .venv-fuzz
FUZZ_SECONDS ?= 60
$(FUZZ_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FUZZ_VENV)
	$(FUZZ_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FUZZ_VENV)/bin/python -m pip install --quiet -e '.[fuzz]'
	touch $@

fuzz: $(FUZZ_VENV)/.installed
	for target in chunk envelopes capture; do \
	  $(FUZZ_VENV)/bin/python fuzz/worker_inputs.py $$target -max_total_time=$(FUZZ_SECONDS) -max_len=4096 || exit 1; \
	done

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(FUZZ_VENV) .pytest_cache .mypy_cache .hypothesis *.egg-info fuzz/corpus
