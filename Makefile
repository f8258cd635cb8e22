# Entry points for people and CI. `make demo`-style targets install what the build
# needs on a fresh Debian machine first (cmake: Pingora builds zlib-ng with it;
# curl: the end-to-end tests use it as their HTTP client).

CARGO ?= cargo
CONFIG ?= config/examples/edge-vm.toml
APT_PACKAGES := cmake curl

.PHONY: deps run test lint ci

deps:
	@missing=""; for p in $(APT_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v cargo-nextest >/dev/null || $(CARGO) install --locked cargo-nextest

# Run the gateway with a shipped example configuration (Ctrl-C stops it).
run: deps
	$(CARGO) run -p isthmus-gateway --bin isthmus -- run --config $(CONFIG)

# The whole test suite: unit, integration and end-to-end (starts real processes).
test: deps
	$(CARGO) nextest run --workspace --no-fail-fast

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
