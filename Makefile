# Two entry points: `make demo` trains the embedded tiny Mixtral, `make test` runs the fast tier
# of the suite. Both create (or reuse) .venv themselves. `make test-all` runs every test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moedpo-installed
# The exact CPU torch the tests run on: the top of the package's range (pyproject.toml), which
# docker/gpu/Dockerfile installs too (tests/test_deploy.py holds them equal).
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-slow test-all docs test-xla test-install assets clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: pip then never looks for a (CUDA) build of its own.
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moedpo train +experiment=demo resume=false overwrite=true
	$(VENV)/bin/moedpo plot runs/demo

# The fast tier: unit tests and short in-process runs. A test is marked
# `slow` (multi-process torchrun runs, kill-and-resume, demo-length training) only where a
# faster test here covers the same behaviour in one process.
test: $(STAMP)
	$(PY) scripts/deps.py show --add kernels --add trl --add pytest
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow" --durations=25

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=25

test-all: test test-slow docs

# The documentation site: the config reference regenerated from the schema, then mkdocs
# --strict (a broken link or anchor fails) into site/.
docs: $(STAMP)
	$(PY) scripts/config_reference.py --write
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The TPU path on the CPU: torch_xla SPMD on 4 virtual devices, in its own venv, cached while
# the requirements resolve to the same releases (scripts/xla_env.sh; ~7 GB, ~3 min to build).
# The venv is docker/tpu/Dockerfile's RUN steps, so this also checks that the TPU image installs;
# then the installed package trains from outside the checkout (scripts/install_check.sh tpu).
test-xla: $(STAMP)
	XLA_PY="$$(bash scripts/xla_env.sh)" && \
	MOEDPO_XLA_PYTHON="$$XLA_PY" $(PY) -m pytest -q tests/parallel/test_spmd.py && \
	bash scripts/install_check.sh tpu "$$XLA_PY"

# What `pip install moedpo` gives, from outside the checkout, at both ends of the supported
# range: docker/gpu/Dockerfile's steps (newest torch, today's releases) and the lower bounds of
# torch and transformers. Fresh venvs each time (~6 GB, ~5 min), removed afterwards.
test-install:
	bash scripts/install_check.sh newest
	bash scripts/install_check.sh oldest

assets: $(STAMP)
	$(PY) scripts/build_assets.py

clean:
	rm -rf $(VENV) runs
