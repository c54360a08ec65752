# DP-CXR: `make demo` runs the study on the embedded synthetic data, `make test` runs the whole test suite (what CI
# runs), `make check` its fast part (no training of whole pipelines, no servers). All set up .venv from
# requirements.lock first (seconds when nothing changed).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Keep every tool's state inside the repository, never in the user's home or the system temp folder.
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR ?= $(CURDIR)/.dvc/site-cache
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := true
export GX_ANALYTICS_ENABLED := false
export UV_CACHE_DIR ?= $(CURDIR)/.cache/uv
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib
# The Data Docs' scripts and styles, fetched from the npm registry once, so the pages work offline.
export DP_CXR_WEB_ASSETS ?= $(CURDIR)/.cache/web-assets
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# dvc.yaml and MLproject call `python`: make it this environment's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup data demo serve test browser check lint bench clean tracking-server tracking-server-stop

setup: $(STAMP) $(DP_CXR_WEB_ASSETS)/.fetched

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

$(DP_CXR_WEB_ASSETS)/.fetched: pipelines/offline_docs.py | $(STAMP)
	$(PY) -m pipelines.offline_docs
	touch $@

# The embedded synthetic multi-site data set (tracked by data.dvc; the same seed gives the same bytes).
data: setup
	$(PY) -m pipelines.data.synthetic --out data \
		--seed $$($(PY) -c "import yaml;print(yaml.safe_load(open('params.yaml'))['data']['synthetic']['seed'])") \
		--scale $$($(PY) -c "import yaml;print(yaml.safe_load(open('params.yaml'))['data']['synthetic']['scale'])") \
		--public-scale $$($(PY) -c "import yaml;print(yaml.safe_load(open('params.yaml'))['data']['synthetic']['public_scale'])")
	$(VENV)/bin/dvc commit --force data.dvc --quiet
	@# DVC's file listing of data.dvc, which tests/data/test_data_version.py checks a sample of images against.
	$(PY) -c "import gzip, yaml, pathlib; h = yaml.safe_load(open('data.dvc'))['outs'][0]['md5']; \
		pathlib.Path('tests/data/data_dvc_listing.json.gz').write_bytes(gzip.compress( \
		pathlib.Path(f'.dvc/cache/files/md5/{h[:2]}/{h[2:]}').read_bytes(), 9, mtime=0))"

# The whole study on the synthetic data: generate, run the DVC pipeline, print the results and what to do next.
demo: data
	$(VENV)/bin/dvc repro
	@git diff --quiet data.dvc 2>/dev/null || echo "note: the generated data differs from the committed data.dvc"
	$(PY) -m pipelines.report --update-readme
	@echo; cat artifacts/report/results_table.md; echo
	@echo "Next:"
	@echo "  mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)   # runs, epsilon per epoch, registry"
	@echo "  open artifacts/report/report.html                      # tables and figures (also: dvc plots show)"
	@echo "  make serve                                             # the BentoML API on 127.0.0.1:3000"

# The inference API for the registered alias serve.alias (after `make demo`), on 127.0.0.1:3000.
serve: setup
	$(PY) -m serving.launch --port 3000

# The team's MLflow server (PostgreSQL, basic auth, artifacts served) on 127.0.0.1:5000, its state in
# .tracking-server/; then `source .tracking-server/env` points MLflow (and `make demo`, `dvc repro`) at it.
tracking-server: setup
	$(PY) -m pipelines.tracking_server start

tracking-server-stop: setup
	$(PY) -m pipelines.tracking_server stop

# Two workers: the tests sharing the tiny study (xdist group tiny_project) run on one, everything else on the other.
test: setup browser
	$(VENV)/bin/ruff check pipelines models serving tests benchmarks
	$(PY) -m pytest -n 2 --dist loadgroup

# Debian's headless Chromium, in which a test opens the report: installed when missing (as root, or with sudo).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then as_root=; elif sudo -n true 2>/dev/null; then as_root=sudo; else \
	    echo "make: the report test needs Chromium: run apt-get install chromium as root"; exit 1; fi; \
	  $$as_root apt-get update -qq && $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	    >/dev/null; }

# The fast loop while changing code: everything not marked slow (unit, data, privacy and single-stage tests).
check: setup
	$(VENV)/bin/ruff check pipelines models serving tests benchmarks
	$(PY) -m pytest -n 2 -m "not slow"

lint: setup
	$(VENV)/bin/ruff check pipelines models serving tests benchmarks

bench: setup
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/validate.py
	$(PY) benchmarks/dp_step.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/serve.py

clean:
	rm -rf artifacts mlruns mlflow.db .bentoml .cache .dvc/site-cache
