# Two commands for users: `make demo` and `make test`. Both set up what they need first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export FLWR_TELEMETRY_ENABLED=0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0

.PHONY: demo test setup data lint consensus clean docs help

demo: setup data
	$(VENV)/bin/sparsepush demo --out-dir runs

test: setup data lint
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (MIT licence, the upstream IDX files).
data:
	@if [ -f $(FMNIST) ] || [ -n "$$SPARSEPUSH_DATA" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Fashion-MNIST: $$SUDO apt-get install -y dataset-fashion-mnist"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing and apt-get is not available: put the four IDX files (train-images-idx3-ubyte.gz, ...)"; \
	  echo "in a folder and set SPARSEPUSH_DATA=<folder>; tests that need it are skipped."; \
	fi

lint: setup
	$(VENV)/bin/ruff check flower_sparsepush strategies simulations tests examples
	$(VENV)/bin/ruff format --check flower_sparsepush strategies simulations tests examples

# The averaging-only experiment behind docs/algorithm.md's table.
consensus: setup
	$(VENV)/bin/sparsepush consensus --nodes 16 --graph exponential --compressor topk:0.01 --gamma 0.02 --rounds 6000 --dim 1000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info runs

# Deployment Engine on loopback: a SuperLink + 4 SuperNodes (own ports, partition-id node configs), one short
# synthetic Sparse-Push run through `flwr run`, then every started process stopped by PID (docs/deployment.md).
.PHONY: deploy-demo
deploy-demo: setup
	$(VENV)/bin/sparsepush deploy-local --nodes 4 --rounds 3 --dataset synthetic --model mlp --out-dir runs/deploy

# Regenerate docs/config.md's table from the code (tests/test_docs.py checks it).
docs: setup
	{ sed '/^| key | default | meaning |$$/,$$d' docs/config.md; $(VENV)/bin/sparsepush config-keys; } > docs/config.md.new
	mv docs/config.md.new docs/config.md

# `make help`: the targets, the variables they take and the run-config keys (generated from config.KEYS; needs
# only Python, not the venv).
help:
	@echo "usage: make [TARGET] [VARIABLE=value ...]"
	@echo ""
	@echo "targets:"
	@echo "  demo          Sparse-Push vs SGP vs FedAvg on Fashion-MNIST, 16 nodes (sparsepush demo --out-dir runs)"
	@echo "  test          lint + the whole test suite"
	@echo "  setup         create $(VENV) and install the package with pip (done by the other targets)"
	@echo "  data          install Fashion-MNIST with apt-get unless it or SPARSEPUSH_DATA is there"
	@echo "  lint          ruff check + ruff format --check"
	@echo "  consensus     the averaging-only experiment of docs/algorithm.md"
	@echo "  deploy-demo   the Deployment Engine on loopback: 4 SuperNodes, 3 rounds (runs/deploy)"
	@echo "  docs          regenerate docs/config.md from the code"
	@echo "  clean         remove $(VENV), caches and runs/"
	@echo "  help          this text"
	@echo ""
	@echo "variables:"
	@echo "  PYTHON=python3.11      the interpreter setup builds $(VENV) with (setup, demo, test, ...); now $(PYTHON)"
	@echo "  SPARSEPUSH_DATA=DIR    (environment) folder(s) with the datasets, separated by ':' (data, demo, test)"
	@echo ""
	@echo "run-config keys of sparsepush train / deploy-local (--key V) and python -m flower_sparsepush.run.inprocess (key=V):"
	@$$( [ -x $(PY) ] && echo $(PY) || echo $(PYTHON) ) -m flower_sparsepush.run.keyhelp
