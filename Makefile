# Quick start (fresh machine):  make demo   |   make test   (then `make web` after the demo)
# Both create/reuse the virtualenv in .venv. `make demo` installs the package and what the
# demo needs (JAX for this machine's accelerator: cuda12 where nvidia-smi runs, tpu on a
# TPU VM, CPU otherwise; override with ACCEL=gpu|tpu|cpu); `make test` adds the dev extra
# (PyTorch and friends: the references of the parity tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-m 'not slow'"`.
PYTEST_ARGS ?=
# PyTorch for the tests: PyPI's torch==2.13.0 is a CUDA build of several GB on Linux;
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build instead.
TORCH_INDEX ?=
ACCEL ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo gpu; \
	elif ls /dev/accel[0-9]* /dev/vfio/[0-9]* >/dev/null 2>&1 || [ -n "$$TPU_NAME$$COLAB_TPU_ADDR$$TPU_ACCELERATOR_TYPE" ]; then echo tpu; \
	else echo cpu; fi)
EXTRA := $(if $(filter gpu tpu,$(ACCEL)),[$(ACCEL)],)

.PHONY: demo test web lint bench libtpu clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.demo-stamp: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.$(EXTRA)'
	touch $@

$(VENV)/.test-stamp: pyproject.toml | $(VENV)/bin/python
	$(if $(TORCH_INDEX),$(PIP) torch==2.13.0 --index-url $(TORCH_INDEX),)
	$(PIP) -e '.[dev,web]'
	touch $@

$(VENV)/.web-stamp: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.[web]'
	touch $@

demo: $(VENV)/.demo-stamp
	$(PY) main.py --demo --workdir=workdirs/demo

# The web chat about the demo's stage-3 model (docs/web.md): http://127.0.0.1:7860
web: $(VENV)/.web-stamp
	$(PY) -m exo2ego_jax.web --workdir=workdirs/demo --data_dir=demo_data \
		--compilation_cache=workdirs/demo/jax_cache

# Two workers, one file each at a time (module fixtures stay in one process): most of the
# suite's time is single-threaded XLA compilation, so this halves it on 2 cores.
test: $(VENV)/.test-stamp
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# libtpu, the TPU compiler of jax[tpu], in a folder of its own (off the venv's import path, so
# nothing else tries to start a TPU): `memory_plan --tpu=v5e:4x4` compiles for TPU slices with
# it on any host, and tests/test_memory_plan.py's TPU test uses it (CI installs it).
LIBTPU_DIR := $(VENV)/libtpu
libtpu: $(LIBTPU_DIR)/.stamp

$(LIBTPU_DIR)/.stamp: $(VENV)/.test-stamp
	$(PIP) --no-deps --upgrade --target $(LIBTPU_DIR) "$$($(PY) -c 'import importlib.metadata as m; \
		print(next(r.split(";")[0].replace(" ", "") for r in m.requires("jax") if r.startswith("libtpu")))')"
	touch $@

lint: $(VENV)/.test-stamp
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(VENV)/.test-stamp
	$(PY) bench/llm_vs_torch.py
	$(PY) bench/train_step.py
	$(PY) bench/pipeline_throughput.py

clean-venv:
	rm -rf $(VENV)
