# forkrl: `make demo` and `make test` work on a fresh clone; each creates/reuses .venv.
# torch comes from your pip: the normal (CUDA) wheel for most users; CI pins the CPU build
# (see .ci/run) before calling `make test`, and that pin is kept since it satisfies torch>=2.4.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,plots,tensorboard
STAMP := $(VENV)/.forkrl-installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks docs
	$(VENV)/bin/ruff format --check src tests benchmarks docs

test: lint
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(VENV)/bin/forkrl demo --out runs/demo

bench: $(STAMP)
	$(PY) benchmarks/logprob_entropy.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
