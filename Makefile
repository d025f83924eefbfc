# Entry points for a fresh machine: `make demo`, `make check` (the fast tier of the tests) and `make test` (every
# test, what CI runs). Each builds .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVICE ?= auto
DEMO_DATA := data/synthetic
DEMO_RUNS := runs/demo
GALLERY_RUNS := runs/gallery
GALLERY_FLATNESS := --samples 32 --density --density-steps 30 --max-steps 20 --trace-probes 10 --lpf-draws 20 \
	--fgap-directions 10 --fgap-relative --fgap-radii 0:0.3:0.05 --grid 11

.PHONY: demo gallery check test venv clean

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

# docs/figures.md: one example of every figure type, from small demo runs (about 5 min on 2 cores)
gallery: venv
	rm -rf $(GALLERY_RUNS)
	$(BIN)/mmlab prepare synthetic --out $(DEMO_DATA)
	for m in image audio sml dml ogm-ge; do $(BIN)/mmlab train --recipe recipes/synthetic/$$m.yaml --data $(DEMO_DATA) \
		--out $(GALLERY_RUNS)/$$m --epochs 3 --track-sharpness 1 --device $(DEVICE) || exit 1; done
	$(BIN)/mmlab flatness $(GALLERY_RUNS)/sml $(GALLERY_RUNS)/dml $(GALLERY_FLATNESS) --device $(DEVICE)
	$(BIN)/mmlab robustness $(GALLERY_RUNS)/image $(GALLERY_RUNS)/audio $(GALLERY_RUNS)/sml $(GALLERY_RUNS)/dml \
		--samples 256 --eps-sweep --device $(DEVICE)
	$(BIN)/mmlab geometry $(GALLERY_RUNS)/sml $(GALLERY_RUNS)/dml --samples 500 --tsne-samples 300 --device $(DEVICE)
	$(BIN)/mmlab report $(GALLERY_RUNS) > /dev/null
	$(BIN)/python docs/gallery.py $(GALLERY_RUNS)

# the fast tier: every test but those marked slow (tests/conftest.py), one end-to-end path included; < 1 min
check: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 -m "not slow"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) data runs
