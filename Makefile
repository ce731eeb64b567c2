# extauthz: `make run` starts the demo, `make test` runs the whole suite. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
IDP_STAMP := examples/idp/node_modules/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install idp protos test unit lint run check-examples clean bench bench-smoke bench-flood bench-fleet chaos wrk redis
.PHONY: image image-base container-host test-image print-image

# The chart's default image (helm/extauthz: values.yaml image.repository, and image.tag or else
# Chart.yaml appVersion), so that what `make image` builds is what `helm install` runs.
CHART := helm/extauthz
APP_VERSION := $(shell sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"[:space:]]*\).*/\1/p' $(CHART)/Chart.yaml)
_chart_image = $(shell awk '/^image:/ {f = 1; next} /^[^[:space:]\#]/ {f = 0} \
  f && $$1 == "$(1):" {gsub(/"/, "", $$2); print $$2}' $(CHART)/values.yaml)
IMAGE_REPOSITORY ?= $(call _chart_image,repository)
IMAGE_TAG ?= $(or $(call _chart_image,tag),$(APP_VERSION))
IMAGE ?= $(IMAGE_REPOSITORY):$(IMAGE_TAG)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

$(IDP_STAMP): examples/idp/package.json examples/idp/package-lock.json
	cd examples/idp && npm ci --no-audit --no-fund --loglevel=error
	touch $@

idp: $(IDP_STAMP)

protos: install
	$(PY) protos/build.py

test: install idp test-image
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit bench/tests

lint: install
	$(VENV)/bin/ruff check extauthz
	$(VENV)/bin/ruff format --check extauthz
	$(VENV)/bin/mypy extauthz

run: install idp
	$(PY) examples/demo.py

check-examples: install
	for f in examples/*.yaml; do $(VENV)/bin/extauthz check-config $$f || exit 1; done

# -- the container image (README.md, "Container image") ----------------------------------------
# docker or podman, whichever is there (ENGINE=... chooses); BASE_IMAGE, CA_BUNDLE, BUILD_FLAGS:
# container/build-image.sh.
image:
	IMAGE=$(IMAGE) VERSION=$(APP_VERSION) bash container/build-image.sh

# The local Debian base again (Debian's security updates), for machines with no registry.
image-base:
	bash container/base-image.sh --force

# As root on Debian: podman, runc, debootstrap and podman's settings for this kind of machine.
container-host:
	bash container/host-setup.sh

# For tests/container: the engine where it can be installed, then the image; says what to
# install when neither is possible.
test-image:
	IMAGE=$(IMAGE) VERSION=$(APP_VERSION) bash container/for-tests.sh

print-image:
	@echo $(IMAGE)

clean:
	rm -rf $(VENV) examples/idp/node_modules .pytest_cache

# -- benchmarks and chaos scenarios (bench/README.md) -------------------------------------------
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk; }

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server; }

bench: $(BENCH_STAMP) wrk redis
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.fleet

# Three replicas, one Redis, one Envoy (about 3 minutes): bench/results/fleet/.
bench-fleet: $(BENCH_STAMP) wrk redis
	$(PY) -m bench.fleet $(FLEET_ARGS)

bench-smoke: $(BENCH_STAMP) wrk
	$(PY) -m bench.run --smoke $(BENCH_ARGS)

# The RSS flood alone, all 200,000 distinct opaque tokens (about 8 minutes): `make bench` stops
# its flood at its time budget and projects the rest from the peaks.
bench-flood: $(BENCH_STAMP) wrk
	$(PY) -m bench.run --scenarios none --flood 200000 --flood-seconds 600 --out bench/results/flood

chaos: $(BENCH_STAMP) wrk
	$(PY) -m bench.chaos $(CHAOS_ARGS)
