# One command each for a fresh machine: `make test`, `make demo`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo install clean bench gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first: deepspeed builds from source against the installed torch.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-build-isolation deepspeed
	$(BIN)/pip install -q --no-build-isolation -e '.[dev,all]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q tests

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/distseg demo

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do DS_ACCELERATOR=cpu $(BIN)/python $$b || exit 1; done

# Wheels that benchmarks/gpu_check.sh installs on a GPU machine without network (docs/gpu_check.md).
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py build .whl

clean:
	rm -rf $(VENV) build *.egg-info
