# Two commands do all the set-up on a fresh machine (Python 3.11 + make):
#   make demo   embeds the bundled demo corpus with the bundled real model (local in-process Ray)
#   make test   runs the whole test suite
# GPU machines: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m jobs.embed --input data/ag_news_1k.parquet --output out/demo_embeddings \
		--model sentence-transformers/all-MiniLM-L6-v2 --on-existing overwrite

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)
