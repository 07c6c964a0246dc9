# tokenwire: `make up` starts everything, `make test` checks everything. Both install whatever is missing.
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)
export CARGO_TARGET_DIR := $(CURDIR)/target
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenwire-installed
RUST_SRC := $(shell find sampler_rs/src -name '*.rs' 2>/dev/null) sampler_rs/Cargo.toml sampler_rs/Cargo.lock

.PHONY: install up test check lint typecheck proto proto-check rust-check pytest helm-check bench bench-sampler bench-gateway bench-serve clean

$(STAMP): pyproject.toml scripts/install.sh $(RUST_SRC)
	./scripts/install.sh
	touch $@

install: $(STAMP)

## Start the gRPC service (:50051) and the HTTP gateway (:8000) on the embedded model (or MODEL=dir-or-hub-id).
up: install
	$(VENV)/bin/tokenwire up $(if $(MODEL),--model $(MODEL),)

## Everything CI runs: stub freshness, lint, types, Rust checks and tests, Python tests.
test: install proto-check lint typecheck rust-check helm-check pytest

check: test

proto: install
	$(PY) scripts/gen_proto.py

proto-check: install
	$(PY) scripts/gen_proto.py --check

lint: install
	$(VENV)/bin/ruff check service gateway tests scripts bench helm
	$(VENV)/bin/ruff format --check service gateway tests scripts bench helm

typecheck: install
	$(VENV)/bin/mypy

rust-check:
	cd sampler_rs && cargo fmt --check
	cd sampler_rs && cargo clippy --all-targets -- -D warnings
	cd sampler_rs && cargo clippy --all-targets --features python -- -D warnings
	cd sampler_rs && cargo test --release

## Chart + image checks: helm lint, rendered-manifest tests, kubernetes-validate, hadolint, clean-venv install.
helm-check: install
	./scripts/helm_check.sh

pytest: install
	$(VENV)/bin/pytest --ignore=tests/test_helm.py

clean:
	rm -rf $(VENV) target sampler_rs/target

## Benchmarks (not tests): each prints a table and writes bench/results/*.json.
bench: bench-sampler bench-gateway bench-serve

bench-sampler: install
	$(PY) bench/sampler.py

bench-gateway: install
	$(PY) bench/gateway.py

bench-serve: install
	$(VENV)/bin/pip install -q fastapi accelerate
	$(PY) bench/serve.py
