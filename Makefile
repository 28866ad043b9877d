# Quick start: `make run` (venv + build + a demo round trip), `make test` (the whole suite).
# Each step runs once: stamps in the venv remember what was installed and built, and a step runs
# again only when its inputs change. pip's and maturin's output goes to $(LOG); on failure its end
# is shown.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
LOG    := $(VENV)/make.log
TOOLS_STAMP := $(VENV)/.tools-installed
BUILT_STAMP := $(VENV)/.built
TEST_STAMP  := $(VENV)/.test-deps-installed
TT_STAMP    := $(VENV)/.torchtune-installed
RUST_SRC    := Cargo.toml Cargo.lock $(shell find rust -name '*.rs')
# run a noisy command quietly: its output goes to $(LOG), and is shown only when it fails
quiet = { $(1); } >>$(LOG) 2>&1 || { tail -n 40 $(LOG); echo "make: failed; the whole log is $(LOG)"; exit 1; }

.PHONY: venv build run test test-py test-rust bench bench-full bench-dcp clean

$(PY):
	python3 -m venv $(VENV)

$(TOOLS_STAMP): | $(PY)
	@echo "make: installing pip and maturin into $(VENV)"
	@$(call quiet,$(PIP) install --upgrade pip maturin)
	@touch $@

venv: $(TOOLS_STAMP)

# maturin develop compiles the native core and installs shardwise (editable) with its runtime
# dependencies only (torch, safetensors, numpy, tqdm); Python sources need no rebuild.
$(BUILT_STAMP): $(TOOLS_STAMP) pyproject.toml $(RUST_SRC)
	@echo "make: building shardwise's native core (release) and installing its dependencies"
	@$(call quiet,VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release)
	@touch $@
	@$(PY) -c "import shardwise, torch; print(f'make: shardwise {shardwise.__version__} ready (torch {torch.__version__})')"

build: $(BUILT_STAMP)

run: $(BUILT_STAMP)
	$(VENV)/bin/shardwise roundtrip

# The test extras (pytest, hypothesis, transformers, peft, ruff, ...) from pyproject.toml.
$(TEST_STAMP): $(BUILT_STAMP) pyproject.toml
	@echo "make: installing the test dependencies"
	@$(PY) -c "import sys; toml = __import__('tomllib') if sys.version_info >= (3, 11) else \
	  __import__('pip._vendor.tomli', fromlist=['loads']); d = toml.load(open('pyproject.toml', 'rb')); \
	  print('\n'.join(d['project']['optional-dependencies']['test']))" > $(VENV)/test-requirements.txt
	@$(call quiet,$(PIP) install -r $(VENV)/test-requirements.txt)
	@touch $@

# For the differential tests only (tests/test_torchtune_diff.py); shardwise itself never imports
# torchtune. torchao is pinned: newer releases lack the module torchtune 0.6.1 imports.
$(TT_STAMP): $(TEST_STAMP)
	@echo "make: installing torchtune 0.6.1 for the differential tests"
	@{ $(PIP) install torchtune==0.6.1 torchao==0.10.0 torchvision >>$(LOG) 2>&1; } \
	  || echo "WARNING: torchtune 0.6.1 did not install; the differential tests will be skipped (see $(LOG))"
	@touch $@

test-rust:
	cargo fmt --check
	cargo clippy --all-targets --all-features --quiet -- -D warnings
	cargo test --quiet

test-py: $(BUILT_STAMP) $(TEST_STAMP) $(TT_STAMP)
	$(VENV)/bin/ruff check python tests benches
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benches --benchmark-disable

test: test-rust test-py

# Benchmarks (ratios, variants interleaved): ~1 GB on tmpfs and disk; `make bench-full` for ~3 GB
bench: $(TEST_STAMP)
	$(PY) -m pytest benches -q -s --benchmark-columns=min,median,max --benchmark-sort=name

bench-full: $(TEST_STAMP)
	SHARDWISE_BENCH_GB=3 $(PY) -m pytest benches -q -s --benchmark-columns=min,median,max --benchmark-sort=name

# The distributed save/load benchmark alone (2 ranks, ~1 GB; SHARDWISE_BENCH_GB, SHARDWISE_BENCH_ROUNDS)
bench-dcp: $(TEST_STAMP)
	$(PY) -m pytest benches/test_bench_dcp.py -q -s

clean:
	rm -rf target $(VENV) .pytest_cache .hypothesis .benchmarks
