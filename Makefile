# kvstack developer entry points. Every target installs what it needs, idempotently.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp changes whenever a pyproject.toml or the set of Python files does: dependency edits
# reinstall, and so does a new module (the strict editable install links files one by one). The
# compiled relay's sources (router/native) count by content: an edit there rebuilds the extension.
STAMP := $(VENV)/.installed-$(shell { cat pyproject.toml tests/support/pyproject.toml; \
  git ls-files -co --exclude-standard -- '*.py' 2>/dev/null; \
  cat router/native/Cargo.toml router/native/Cargo.lock router/native/src/*.rs 2>/dev/null; } \
  | sha1sum | cut -c1-12)
# cargo's build folder lives outside the checkout, shared by rebuilds (incremental) and worktrees.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/kvstack/cargo-target
PYTEST_ARGS ?=

.PHONY: help run test lint fmt unit bench venv sysdeps clean

help:
	@echo "make run    - start the local stack: simulated vLLM engines behind the router on :8000"
	@echo "make test   - lint, type-check and run every test"
	@echo "make lint   - ruff + mypy"
	@echo "make bench  - run the benchmarks, write JSON + PNG under bench-results/"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# strict: setuptools' default editable finder cannot map a folder without __init__.py (operator/,
	@# kept so to never shadow the stdlib) into a package; strict links every file under build/.
	$(BIN)/python -m pip install -q --config-settings editable_mode=strict -e '.[dev,bench]' -e tests/support
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

sysdeps:
	@bash scripts/install-sysdeps.sh

# sysdeps installs redis-server (LMCache's shared tier in `kvstack up`) and prometheus when missing;
# options go through UP_ARGS: make run UP_ARGS='--engines 4 --prometheus'.
UP_ARGS ?=
run: venv sysdeps
	$(BIN)/kvstack up $(UP_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/kvstack dashboards generate --check
	$(BIN)/python -m kvstack.operator.crd --check
	$(BIN)/python -m kvstack.values_reference --check
	# the relay's Rust, where the toolchain has the tools (the build itself is optional too)
	if cargo fmt --version > /dev/null 2>&1; then cd router/native && cargo fmt --check; fi
	if cargo clippy --version > /dev/null 2>&1; then cd router/native && cargo clippy -q --release -- -D warnings; fi

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# KVSTACK_REQUIRE_NATIVE: here the compiled relay must have been built (tests/router_native).
unit: venv sysdeps
	KVSTACK_REQUIRE_NATIVE=1 $(BIN)/pytest $(PYTEST_ARGS)

test: lint unit

bench: venv sysdeps
	$(BIN)/kvstack bench all --out bench-results

clean:
	rm -rf $(VENV) build tests/support/build .mypy_cache .ruff_cache .pytest_cache

# A real Kubernetes 1.34 control plane on loopback (etcd, kube-apiserver, controller-manager, scheduler,
# kwok with fake GPU nodes), plus a simulator behind every engine pod; Ctrl-C stops it. Tools are built
# once into ~/.cache/kvstack/bin (see cluster/README.md).
.PHONY: cluster cluster-clean
cluster: venv
	$(BIN)/python -m kvstack_testing cluster

# Kills and removes clusters whose owner is gone (a killed test run, a closed terminal).
cluster-clean: venv
	$(BIN)/python -m kvstack_testing clean
