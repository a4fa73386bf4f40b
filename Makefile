# The README's commands. Every target that builds runs set-up first, so each
# works on a fresh machine; set-up is idempotent and fast when done.

CARGO ?= cargo
# The shared PyTorch environment scripts/setup.sh creates (same cache rule).
JEPA_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ecijepa
JEPA_PY ?= $(JEPA_CACHE)/torch-2.11.0/bin/python
PARITY_DIR ?= target/parity
# The release binary `make bench` times (cargo's target folder may be moved),
# and the driver's options: one CPU thread per side keeps the figures steady
# on a loaded machine; `make bench BENCH_ARGS=` uses libtorch's default.
RELEASE_DIR ?= $(or $(CARGO_TARGET_DIR),target)/release
BENCH_BIN ?= $(RELEASE_DIR)/jepa-worker
BENCH_ARGS ?= --threads 1 --rounds 3
export CARGO_TERM_COLOR ?= never

.PHONY: setup build test lint unit link-check parity bench bench-allreduce demo clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: setup
	$(CARGO) test --workspace

link-check: setup
	$(CARGO) build --workspace --bins
	scripts/check-links.sh target/debug

# The Rust model against the PyTorch reference in tests/parity (f32, 1e-5).
parity: setup
	$(CARGO) run -p jepa-worker --example export_parity -- $(PARITY_DIR)
	$(JEPA_PY) tests/parity/check_parity.py $(PARITY_DIR)

# Training-step speed of Rust against PyTorch eager on the same workload
# (tests/bench, docs/bench.md): small CPU cases, about 2 minutes on 2
# cores. Not part of `test`: its figures depend on the machine's load.
bench: setup
	$(CARGO) build --release -p jepa-worker --bin jepa-worker
	$(JEPA_PY) tests/bench/compare.py --bin $(BENCH_BIN) $(BENCH_ARGS)

# All-reduce bandwidth of the CPU ring against torch.distributed gloo on
# loopback (tests/bench/allreduce.py; docs/bench.md). Not part of `test`.
bench-allreduce: setup
	$(CARGO) build --release -p jepa-worker --bin jepa-worker
	$(JEPA_PY) tests/bench/allreduce.py --bin $(BENCH_BIN) $(ALLREDUCE_ARGS)

test: lint unit link-check parity

# Coordinator, one worker daemon, an EC-IJEPA and an I-JEPA run through the
# gRPC API (scripts/demo.sh; DEMO_STEPS, DEMO_PORT, DEMO_DATA adjust it).
demo: setup
	$(CARGO) build --release --workspace --bins
	BIN_DIR=$(RELEASE_DIR) scripts/demo.sh

clean:
	$(CARGO) clean
