# Quick start: `make run` (venv + build + a demo round trip), `make test` (the whole suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.deps-installed
TT_STAMP := $(VENV)/.torchtune-installed

.PHONY: venv build run test test-py test-rust bench bench-full bench-dcp clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q maturin
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

# For the differential tests only (tests/test_torchtune_diff.py); shardwise itself never imports
# torchtune. torchao is pinned: newer releases lack the module torchtune 0.6.1 imports.
$(TT_STAMP): $(STAMP)
	$(PIP) install -q torchtune==0.6.1 torchao==0.10.0 torchvision \
	  || echo "WARNING: torchtune 0.6.1 did not install; the differential tests will be skipped"
	touch $(TT_STAMP)

build: venv
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release --quiet

run: build
	$(VENV)/bin/shardwise roundtrip

test-rust:
	cargo fmt --check
	cargo clippy --all-targets --all-features --quiet -- -D warnings
	cargo test --quiet

test-py: build $(TT_STAMP)
	$(VENV)/bin/ruff check python tests benches
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benches --benchmark-disable

test: test-rust test-py

# Benchmarks (ratios, variants interleaved): ~1 GB on tmpfs and disk; `make bench-full` for ~3 GB
bench: build
	$(PY) -m pytest benches -q --benchmark-columns=min,median,max --benchmark-sort=name

bench-full: build
	SHARDWISE_BENCH_GB=3 $(PY) -m pytest benches -q --benchmark-columns=min,median,max --benchmark-sort=name

# The distributed save/load benchmark alone (2 ranks, ~1 GB; SHARDWISE_BENCH_GB, SHARDWISE_BENCH_ROUNDS)
bench-dcp: build
	$(PY) -m pytest benches/test_bench_dcp.py -q -s

clean:
	rm -rf target $(VENV) .pytest_cache .hypothesis .benchmarks
