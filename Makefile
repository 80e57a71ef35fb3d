# The two commands: `make demo` (the main job, end to end, tiny CPU profile) and `make test`.
# Each creates .venv when missing and installs what it needs; fast when everything is installed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.show1-installed
# A CPU wheel of this torch is cached on the project machines; plain `torch` would pull a CUDA build.
TORCH  ?= torch==2.13.0
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	@# Pin whatever torch is installed so pip never swaps in another build while resolving extras.
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt -e '.[dev,demo]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.curate

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest
