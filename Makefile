# Developer entry points. Everything runs from the project's own virtualenv, .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the dependencies change.
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: install serve test lint demo

install: $(STAMP)

# torch/torchvision pinned on the command line: the CPU/GPU wheels this machine ships
# (pyproject allows them); an unpinned resolve could pull a several-GB download.
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]' -e ./client 'torch==2.14.1' 'torchvision==0.29.1'
	touch $@

serve: install
	PORT=$(PORT) $(PY) -m scripts.serve

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(PY) -m scripts.demo
