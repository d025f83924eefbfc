# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVICE ?= auto
DEMO_DATA := data/synthetic
DEMO_RUNS := runs/demo

.PHONY: demo test venv clean

include recipes/reproduce.mk

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt pip setuptools  # the installer, pinned too

# Installs pin every package to constraints.txt; a change to it or to pyproject.toml re-installs.
# `venv` is the base install (demo, reproduce-*); `make test` adds the extras the tests exercise.
$(VENV)/.installed-base: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed-base

demo: venv
	rm -rf $(DEMO_RUNS)
	$(BIN)/mmlab prepare synthetic --out $(DEMO_DATA)
	$(BIN)/mmlab train --recipe recipes/synthetic/image.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/image --device $(DEVICE)
	$(BIN)/mmlab train --recipe recipes/synthetic/audio.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/audio --device $(DEVICE)
	$(BIN)/mmlab train --recipe recipes/synthetic/sml.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/sml --device $(DEVICE)
	$(BIN)/mmlab train --recipe recipes/synthetic/dml.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/dml --device $(DEVICE)
	$(BIN)/mmlab report $(DEMO_RUNS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) data runs
