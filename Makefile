# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (README).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup test demo lint clean

# The venv is (re)built when pyproject.toml changes. pip resolves torch and torchvision together; the import
# check proves the pair works (a mismatched pair fails with "operator torchvision::nms does not exist").
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, torchvision.ops; torchvision.ops.nms; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ops ok')"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/epee demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf build dist *.egg-info .pytest_cache logs model_store/*.mar
