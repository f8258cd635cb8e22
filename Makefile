# Entry points for people and CI. Targets install what the build needs on a fresh
# Debian machine first (cmake: Pingora builds zlib-ng with it; curl, openssl,
# dig and kdig: the end-to-end tests use them as outside clients; nsd: the
# upstream resolver in the DNS tests; lintian, rpm, cargo-deb and
# cargo-generate-rpm: the packaging test builds and checks the packages).

CARGO ?= cargo
# command:Debian package
APT_TOOLS := cmake:cmake curl:curl openssl:openssl dig:bind9-dnsutils kdig:knot-dnsutils \
	/usr/sbin/nsd:nsd nft:nftables ip:iproute2 lintian:lintian rpm:rpm
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
FUZZ_FLAGS := --target-dir target/fuzz
FUZZ_RUNS := $(addprefix federation/fuzz:,$(FEDERATION_FUZZ_TARGETS)) \
	$(addprefix gateway/fuzz:,$(GATEWAY_FUZZ_TARGETS))

SHELL := /bin/bash
.PHONY: deps run demo test lint fuzz packages image systemd-test

deps:
	@missing=""; for t in $(APT_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v cargo-nextest >/dev/null || $(CARGO) install --locked cargo-nextest
	@command -v cargo-deb >/dev/null || $(CARGO) install --locked cargo-deb
	@command -v cargo-generate-rpm >/dev/null || $(CARGO) install --locked cargo-generate-rpm

# Run the gateway with the packaged configuration plus a development identity
# (overridden from the environment) and its SPIFFE bundle endpoint on :15013.
# Ctrl-C stops it.
run: deps
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
demo: deps
	$(CARGO) build -p isthmus-gateway --bin isthmus
	$(ISTHMUS) demo

# The whole test suite: unit, integration and end-to-end (starts real processes).
test: deps
	$(CARGO) nextest run --workspace --no-fail-fast

# Packages and the OCI image; PROFILE=dev packages the debug build (faster, for
# checks: CI uses it), PROFILE=release what ships.
PROFILE ?= release
PACKAGES := target/packages-$(PROFILE)

# .deb and .rpm in target/packages-$(PROFILE), with what they hold and lintian's verdict.
packages: deps
	$(CARGO) build --profile $(PROFILE) -p isthmus-gateway --bin isthmus
	packaging/build.sh --profile $(PROFILE) --no-build --out $(PACKAGES)

# The .deb under real systemd: Debian booted with systemd-nspawn (root needed).
systemd-test: packages
	packaging/test-systemd.sh $$(ls -t $(PACKAGES)/isthmus_*.deb | head -n 1)

# The OCI image (buildah), then run with podman: read-only, non-root, /readyz,
# health check, clean stop.
image: deps
	$(CARGO) build --profile $(PROFILE) -p isthmus-gateway --bin isthmus
	packaging/build-image.sh --profile $(PROFILE) --no-build --check

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Build every fuzz target and run each for FUZZ_SECONDS from its seeds. The
# stable toolchain builds them with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags).
# Each fuzz dir starts from the workspace's Cargo.lock, so it fuzzes the
# dependency versions that ship.
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
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
