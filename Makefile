# The README's commands. Every target that builds runs set-up first, so each
# works on a fresh machine; set-up is idempotent and fast when done.

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: setup build test lint unit link-check demo clean

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

test: lint unit link-check

demo: setup
	$(CARGO) build --release --workspace --bins
	target/release/jepa-worker info

clean:
	$(CARGO) clean
