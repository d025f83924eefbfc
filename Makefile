# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVICE ?= auto
DEMO_DATA := data/synthetic
DEMO_RUNS := runs/demo

.PHONY: demo test venv clean

include recipes/reproduce.mk

$(BIN)/mmlab: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/mmlab

venv: $(BIN)/mmlab

demo: venv
	rm -rf $(DEMO_RUNS)
	$(BIN)/mmlab prepare synthetic --out $(DEMO_DATA)
	$(BIN)/mmlab train --recipe recipes/synthetic/image.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/image --device $(DEVICE)
	$(BIN)/mmlab train --recipe recipes/synthetic/audio.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/audio --device $(DEVICE)
	$(BIN)/mmlab train --recipe recipes/synthetic/sml.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/sml --device $(DEVICE)
	$(BIN)/mmlab train --recipe recipes/synthetic/dml.yaml --data $(DEMO_DATA) --out $(DEMO_RUNS)/dml --device $(DEVICE)
	$(BIN)/mmlab report $(DEMO_RUNS)

test: venv
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) data runs
