# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1

.PHONY: install demo text test lint bench repo clean-artifacts

# torch first and with pip: 2.14.1 + 0.29.1 come from this machine's disk; uv/poetry would download.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The pipeline needs a git + DVC repo; a tarball checkout becomes one.
repo:
	@git rev-parse --git-dir >/dev/null 2>&1 || { git init -q && git add -A && \
	  git -c user.name=reflow -c user.email=reflow@localhost commit -qm "reflow checkout"; }
	@test -d .dvc || dvc init -q

demo: install repo
	@start=$$(date +%s); reflow run; status=$$?; \
	  echo "make demo: pipeline wall time $$(( $$(date +%s) - start )) s"; exit $$status

# The text pipeline (text/dvc.yaml): InstaFlow's chain, text prompts to a one-step student. Not part of demo.
text: install repo
	@start=$$(date +%s); reflow run --pipeline text; status=$$?; \
	  echo "make text: pipeline wall time $$(( $$(date +%s) - start )) s"; exit $$status

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .

# PRESET=presets/imagenet256.yaml: a GPU preset's models and the GPU path (bf16, TF32, SDPA, fused AdamW,
# torch.compile, model FLOP utilisation) instead of the CPU demo's figures.
bench: install
	$(PY) bench/run.py $(if $(PRESET),--preset $(PRESET))

clean-artifacts:
	rm -rf artifacts metrics dvc.lock mlflow.db .reflow text/artifacts text/metrics text/report text/dvc.lock
