# Two commands a user needs: `make run` and `make test`. Both build .venv first (once).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/toy.yaml

.PHONY: setup run test bench clean
setup: $(VENV)/.installed

# torch first, pinned to the CPU build that pip finds locally; an unpinned torch pulls a multi-GB CUDA build.
# DeepSpeed builds against the installed torch, so the project installs without build isolation.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev]'
	touch $@

run: setup
	$(BIN)/imm-ray run $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev,bench]'
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
