# `make serve`: set everything up and serve the default model (SmolLM2-135M-Instruct) on :8000.
# `make test`:  set everything up and run the test suite (CPU is enough).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: setup serve test clean

setup: $(VENV)/.installed

# A virtual environment that can see an already-installed torch; torch==2.13.0 is installed only if missing.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	touch $@

serve: setup
	$(BIN)/vllm-engine serve $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
