# Two entry points: `make demo` trains the embedded tiny Mixtral, `make test` runs the suite.
# Both create (or reuse) .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moedpo-installed

.PHONY: demo test test-xla lint assets clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: pip then never looks for a (CUDA) build of its own.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moedpo train +experiment=demo resume=false overwrite=true
	$(VENV)/bin/moedpo plot runs/demo

test: $(STAMP)
	$(PY) scripts/deps.py show --add kernels --add trl --add pytest
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The TPU path on the CPU: torch_xla SPMD on 4 virtual devices, in its own venv, cached while
# the requirements resolve to the same releases (scripts/xla_env.sh; ~7 GB, ~3 min to build).
test-xla: $(STAMP)
	MOEDPO_XLA_PYTHON="$$(bash scripts/xla_env.sh)" $(PY) -m pytest -q tests/parallel/test_spmd.py

assets: $(STAMP)
	$(PY) scripts/build_assets.py

clean:
	rm -rf $(VENV) runs
