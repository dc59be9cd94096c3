# `make serve`: set everything up and serve the default model (SmolLM2-135M-Instruct) on :8000.
# `make test`:  set everything up and run the test suite (CPU is enough).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: setup serve test browser clean

setup: $(VENV)/.installed

# A virtual environment that can see an already-installed torch; torch==2.13.0 is installed only if missing.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	touch $@

serve: setup
	$(BIN)/vllm-engine serve $(ARGS)

test: setup browser
	$(BIN)/python -m pytest -q -p no:cacheprovider tests $(ARGS)

# Headless Chromium for the dashboard's browser test: Debian's package, where this user can install
# it; elsewhere that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	echo "chromium not installed: the dashboard's browser test will be skipped"

clean:
	rm -rf $(VENV) build *.egg-info
