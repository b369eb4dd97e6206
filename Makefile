# The two commands a new machine needs: `make run` and `make test`.
# Both create .venv on first use (and reuse it afterwards) from the pinned requirements.lock.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
INSTALLED := $(VENV)/.installed

# The embedded default: everything lives under .local/ in the checkout.
export TWOCLUSTER_STORE_URI ?= file://$(CURDIR)/.local/store
# spark-submit must be found on PATH (the Airflow Spark provider runs the bare command).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

DAYS ?= 4
CLIPS_PER_DAY ?= 600
# make run's Spark: a local Spark Connect server it starts and stops (connect), or a spark-submit per job (submit).
SPARK ?= connect
PYTEST_ARGS ?=

.PHONY: run run-images test venv lock lint clean sample-data check-java bench bench-quick ui stack-up stack-demo stack-down screenshots

run: venv check-java
	@tools/ensure_system_packages.sh espeak-ng=espeak-ng
	$(VENV_PY) -m twocluster_demo.run_main --days $(DAYS) --clips-per-day $(CLIPS_PER_DAY) --spark $(SPARK)

# An extra: the second pipeline (handwritten digit images) through the same DAG factory.
run-images: venv check-java
	$(VENV_PY) -m twocluster_demo.run_main --spec pipelines/digits.yaml --days 4 --clips-per-day 450

test: venv check-java
	@tools/ensure_system_packages.sh espeak-ng=espeak-ng ceph-mon=ceph-mon ceph-osd=ceph-osd radosgw=radosgw pg_ctlcluster=postgresql aplay=alsa-utils docker-compose=docker-compose chromium=chromium
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

bench: venv check-java
	@tools/ensure_system_packages.sh espeak-ng=espeak-ng
	$(VENV_PY) bench/run.py

bench-quick: venv check-java
	@tools/ensure_system_packages.sh espeak-ng=espeak-ng
	$(VENV_PY) bench/run.py --quick

# An extra: the Airflow UI with the ops page over .local/store (after `make run`), until Ctrl-C.
ui: venv
	$(VENV_PY) -m twocluster_devtools.ui

# An extra: the compose topology as processes on 127.0.0.1 (no Docker): PostgreSQL, Ceph RGW with
# per-component users, a Spark standalone master + 2 workers, Airflow's api-server, scheduler,
# dag-processor and triggerer. Returns once healthy; URLs and login in .local/stack/endpoints.json.
STACK_PACKAGES := ceph-mon=ceph-mon ceph-osd=ceph-osd radosgw=radosgw pg_ctlcluster=postgresql
stack-up: venv check-java
	@tools/ensure_system_packages.sh $(STACK_PACKAGES) espeak-ng=espeak-ng
	$(VENV_PY) -m twocluster_devtools.stack up

# An extra, after stack-up: sample arrivals for DAYS days dropped with the ingest identity (raw/
# only), the pipeline unpaused and backfilled, followed to the end, then `twocluster status` with
# the stack's read-only operator key.
stack-demo: venv
	@tools/ensure_system_packages.sh espeak-ng=espeak-ng
	$(VENV_PY) -m twocluster_devtools.stack_demo --days $(DAYS) --clips-per-day $(CLIPS_PER_DAY)

stack-down:
	@test -x $(VENV_PY) && $(VENV_PY) -m twocluster_devtools.stack down || true

# An extra, after `make run`: the README's screenshot of the ops page over .local/store.
screenshots: venv
	@test -d .local/store/predictions || { echo "run make run first: the screenshot shows its store"; exit 1; }
	$(VENV_PY) -m pytest tests/test_ops_ui.py -k readme_screenshot -p no:cacheprovider

sample-data: venv
	@tools/ensure_system_packages.sh espeak-ng=espeak-ng
	$(VENV_PY) -m twocluster_demo.sample_data --store $(TWOCLUSTER_STORE_URI) --days $(DAYS) --clips-per-day $(CLIPS_PER_DAY)

venv: $(INSTALLED)

# Bytecode is compiled once here: uv installs no .pyc files, and where PYTHONDONTWRITEBYTECODE is
# set (as on CI's machines) Python never caches one, so every process compiled every module it
# imported: `airflow version` 7.3 s -> 3.0 s with them, `import tensorflow` 24.3 s -> 8 s, an
# `airflow dags test` of 11 no-op tasks 24.4 s -> 15 s (2026-12-01, this 2-core machine).
# compileall rather than uv's --compile-bytecode, which skips packages already installed.
$(INSTALLED): requirements.lock pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "error: Python 3.11 is required (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(VENV_PY) -m pip install -q "uv==$(UV_VERSION)"
	$(UV) pip install -q --python $(VENV_PY) -r requirements.lock
	$(UV) pip install -q --python $(VENV_PY) --no-deps -e .
	$(VENV_PY) -m compileall -q -j 0 $$($(VENV_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') src
	@touch $@

check-java:
	@tools/check_java.sh

# Re-pin after editing pyproject.toml's dependencies.
lock: $(UV)
	$(UV) pip compile pyproject.toml --all-extras --python-version 3.11 -o requirements.lock

$(UV):
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q "uv==$(UV_VERSION)"

lint: venv
	$(VENV)/bin/ruff check src tests dags spark_jobs training_jobs plugins

clean:
	rm -rf .local .pytest_cache
