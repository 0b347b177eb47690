# Two commands a fresh machine needs: `make demo` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test lint bench bench-h2h serve

install: $(VENV)/.installed

# torch first, pinned: the CPU build lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,ray,tensorboard,mlflow]'
	# DeepSpeed ships as a source package whose build imports torch: built against the torch above, not a new one.
	$(PIP) install -q --no-build-isolation 'deepspeed==0.19.8'
	touch $@

demo: install
	$(VENV)/bin/rf demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/orchestration.py

# The head-to-head benchmark runs in its own environment: Ray Tune and matplotlib are not project dependencies.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q -e . 'ray[tune]==2.60.0' 'matplotlib==3.11.2'
	touch $@

bench-h2h: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/head_to_head.py --ray-python $(BENCH_VENV)/bin/python $(H2H_ARGS)

# The deployment path on one machine: a Prefect server, the rf server and a serve process for every deployment in
# deployments/prefect.yaml, all on 127.0.0.1, in the foreground; Ctrl-C stops all three. SERVE_ARGS e.g.
# "--prefect-port 4300 --no-ui". Then: PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'rf-fit/demo'
serve: install
	$(PY) deployments/serve.py $(SERVE_ARGS)
