# The papers' experiments end to end, included by the Makefile (results: docs/results/).
#   make reproduce-avmnist [MNIST=DIR FSDD=DIR] [SEEDS="0 1 2"] [DEVICE=cuda]
#   make reproduce-synthetic [SEEDS="0 1 2"] [AUDIO_INFO="0.3 0.25 0.2 0.15 0.1 0.05"]
# Every step is a file target or an idempotent mmlab call, so an interrupted reproduction picks up where it
# stopped: a finished run (metrics.json) is skipped, an interrupted one resumes from its last checkpoint, and
# the analyses reuse their JSON when the settings and the checkpoint are unchanged.
#
# On a CPU the runs go JOBS at a time (default: one per core) with one thread each, so they share the cores
# without oversubscribing them (make -O prints each step's output when that step ends); the settings
# are cut to fit 60 minutes on 2 cores (docs/results/avmnist.md says how they were chosen).
# DEVICE=cuda runs the recipes as written: the DML paper's Table 6.

MNIST ?= ../shared/data/mnist
FSDD ?= ../shared/data/fsdd
SEEDS ?= 0 1 2
MMLAB := $(BIN)/mmlab

AVMNIST_DATA := data/avmnist
AVMNIST_RUNS := runs/avmnist
# longest first, so the JOBS slots stay busy to the end
AVMNIST_METHODS := sml-dagr dml-dagr sml dml audio image

SYNTH_DATA := data/synthetic-sweep
SYNTH_RUNS := runs/synthetic-sweep
SYNTH_METHODS := sml-dagr sml dml audio image
# image-only ~83 % test accuracy; audio 0.3 matches it (balanced), 0.05 leaves audio near chance
IMAGE_INFO ?= 0.2
AUDIO_INFO ?= 0.3 0.25 0.2 0.15 0.1 0.05

ifeq ($(DEVICE),cuda)
JOBS ?= 1
THREADS :=
AVMNIST_TRAIN :=
AVMNIST_FLATNESS := --samples 1000
AVMNIST_ROBUSTNESS := --corruption missing-zero,gaussian --severity 0,0.5,1
AVMNIST_GEOMETRY :=
else
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
THREADS := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# ResNet18 for 70 epochs is days of CPU: a 16-32-64 CNN per modality (stride-2 stem on the 112x112
# spectrogram, like ResNet's), 64-d embeddings, 8 epochs with the step at 6; lr 0.1 chosen on val.
AVMNIST_TRAIN := --encoder image=tiny_cnn,audio=strided_cnn --embed-dim 64 --epochs 8 --step-size 6 --lr 0.1
AVMNIST_FLATNESS := --samples 256 --trace-probes 0 --lpf-draws 50
AVMNIST_ROBUSTNESS := --corruption missing-zero,gaussian --severity 0,0.5,1 --samples 1000
AVMNIST_GEOMETRY := --tsne-samples 500
endif
SYNTH_FLATNESS := --samples 256 --trace-probes 0 --lpf-draws 50
SYNTH_ROBUSTNESS := --corruption none --samples 500

method_of = $(firstword $(subst -seed, ,$(notdir $(1))))
seed_of = $(lastword $(subst -seed, ,$(notdir $(1))))
runs_of = $(foreach m,$(2),$(foreach s,$(SEEDS),$(1)/$(m)-seed$(s)))
# $(call train_or_resume,RUN_DIR,RECIPE,DATA,FLAGS): resume a run that has a config, else start it.
train_or_resume = if [ -f $(1)/config.yaml ]; then $(THREADS) $(MMLAB) train --resume --out $(1); \
	else $(THREADS) $(MMLAB) train --recipe $(2) --data $(3) $(4) --seed $(call seed_of,$(1)) \
	--device $(DEVICE) --out $(1); fi
# $(call analyse,RUN_DIR,FLATNESS,ROBUSTNESS,GEOMETRY): each writes its JSON into the run, or reuses it.
analyse = $(THREADS) $(MMLAB) flatness $(1) --metric hessian,lpf $(2) --device $(DEVICE) && \
	$(THREADS) $(MMLAB) robustness $(1) $(3) --device $(DEVICE) && \
	$(THREADS) $(MMLAB) geometry $(1) $(4) --device $(DEVICE)

.PHONY: reproduce-avmnist reproduce-synthetic FORCE
.SECONDARY:  # keep every run and dataset make builds on the way (never delete them as intermediates)

reproduce-avmnist: venv
	$(MMLAB) prepare avmnist --mnist $(MNIST) --fsdd $(FSDD) --out $(AVMNIST_DATA)
	$(MAKE) --no-print-directory -j$(JOBS) -O $(addsuffix /analysed,$(call runs_of,$(AVMNIST_RUNS),$(AVMNIST_METHODS)))
	$(MMLAB) report $(AVMNIST_RUNS)

$(AVMNIST_RUNS)/%/metrics.json:
	$(call train_or_resume,$(@D),recipes/avmnist/$(call method_of,$*).yaml,$(AVMNIST_DATA),$(AVMNIST_TRAIN))

$(AVMNIST_RUNS)/%/analysed: $(AVMNIST_RUNS)/%/metrics.json FORCE
	$(call analyse,$(@D),$(AVMNIST_FLATNESS),$(AVMNIST_ROBUSTNESS),$(AVMNIST_GEOMETRY))

reproduce-synthetic: venv
	$(MAKE) --no-print-directory -j$(JOBS) -O \
		$(foreach a,$(AUDIO_INFO),$(addsuffix /analysed,$(call runs_of,$(SYNTH_RUNS)/audio-$(a),$(SYNTH_METHODS))))
	$(MMLAB) report $(SYNTH_RUNS)

$(SYNTH_DATA)/audio-%/manifest.json:
	$(MMLAB) prepare synthetic --image-info $(IMAGE_INFO) --audio-info $* --out $(@D)

# runs/synthetic-sweep/audio-0.1/sml-seed0: the level is the parent folder's name.
.SECONDEXPANSION:
$(SYNTH_RUNS)/%/metrics.json: $(SYNTH_DATA)/$$(firstword $$(subst /, ,$$*))/manifest.json
	$(call train_or_resume,$(@D),recipes/synthetic/$(call method_of,$*).yaml,$(<D),)

$(SYNTH_RUNS)/%/analysed: $(SYNTH_RUNS)/%/metrics.json FORCE
	$(call analyse,$(@D),$(SYNTH_FLATNESS),$(SYNTH_ROBUSTNESS),--tsne-samples 0)

FORCE:
