# Quick start (fresh machine):  make demo   |   make web (after make demo)   |   make test
# All create/reuse the virtualenv in .venv and install the package with its dev and web
# extras (the web chat's Gradio; the demo itself needs neither).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-m 'not slow'"`.
PYTEST_ARGS ?=

.PHONY: demo web test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,web]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) main.py --demo --workdir=workdirs/demo

# The web chat about the demo's stage-3 model (docs/web.md): http://127.0.0.1:7860
web: $(STAMP)
	$(PY) -m exo2ego_jax.web --workdir=workdirs/demo --data_dir=demo_data \
		--compilation_cache=workdirs/demo/jax_cache

# Two workers, one file each at a time (module fixtures stay in one process): most of the
# suite's time is single-threaded XLA compilation, so this halves it on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/llm_vs_torch.py
	$(PY) bench/train_step.py
	$(PY) bench/pipeline_throughput.py

clean-venv:
	rm -rf $(VENV)
