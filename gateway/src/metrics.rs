//! Prometheus metrics: one explicit [`Registry`] per process, passed down to each
//! component, which registers its own typed metrics struct. The global registry
//! and its macros are banned (clippy.toml).

use prometheus::core::Collector;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Prefix of every metric this process exports.
pub const NAMESPACE: &str = "isthmus";

isthmus_federation::label_enum! {
    /// How the binary was built: the `profile` label of `isthmus_build_info`.
    pub enum Profile {
        /// With debug assertions.
        Debug => "debug",
        /// Without.
        Release => "release",
    }
}

impl Profile {
    /// The profile of this binary.
    pub const CURRENT: Self = if cfg!(debug_assertions) {
        Self::Debug
    } else {
        Self::Release
    };
}

isthmus_federation::label_enum! {
    /// A listener that accepts connections from outside: the `listener` label
    /// of the data-plane and connection-cap metrics. The clusterset listeners
    /// serve through the outbound proxy, so their requests and L4 connections
    /// count under `outbound`; only their connection caps, header deadline and
    /// load gauges (open connections, requests in flight and waiting) count
    /// under `clusterset`.
    pub enum Listener {
        /// `outbound.listen` and the outbound `tcp` ports.
        Outbound => "outbound",
        /// `east_west.listen`.
        EastWest => "east_west",
        /// The listeners at clusterset IPs.
        Clusterset => "clusterset",
        /// `admin.listen`.
        Admin => "admin",
        /// The SPIFFE bundle endpoint.
        BundleEndpoint => "bundle_endpoint",
    }
}

/// Creates the process registry with build information and process metrics
/// (`isthmus_process_cpu_seconds_total`, `isthmus_process_resident_memory_bytes`, ...).
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    let build_info = IntGaugeVec::new(
        Opts::new("build_info", "Build information; the value is always 1.").namespace(NAMESPACE),
        &["version", "rustc", "profile"],
    )
    .expect("static metric definition is valid");
    build_info
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            env!("ISTHMUS_RUSTC_VERSION"),
            Profile::CURRENT.label(),
        ])
        .set(1);
    register(&registry, build_info);
    register(
        &registry,
        prometheus::process_collector::ProcessCollector::new(std::process::id() as i32, NAMESPACE),
    );
    #[cfg(feature = "count-allocations")]
    if let Some(read) = allocations::READ.get() {
        register(&registry, allocations::Allocations::new(*read));
    }
    registry
}

/// Hands the registry the binary's allocation count (built with the
/// `count-allocations` feature: `gateway/src/main.rs` wraps the global
/// allocator). Call it before the first [`new_registry`]; later calls are
/// ignored.
#[cfg(feature = "count-allocations")]
pub fn count_allocations(read: fn() -> u64) {
    let _ = allocations::READ.set(read);
}

/// `isthmus_process_allocations_total`, for the benchmarks: exported only by
/// a binary built with the `count-allocations` feature.
#[cfg(feature = "count-allocations")]
mod allocations {
    use std::sync::OnceLock;

    use prometheus::core::{Collector, Desc};
    use prometheus::proto::MetricFamily;
    use prometheus::{IntCounter, Opts};

    use super::NAMESPACE;

    /// Reads the binary's allocation count.
    pub(super) static READ: OnceLock<fn() -> u64> = OnceLock::new();

    /// A counter that catches up with the allocation count when gathered.
    pub(super) struct Allocations {
        counter: IntCounter,
        read: fn() -> u64,
    }

    impl Allocations {
        pub(super) fn new(read: fn() -> u64) -> Self {
            let counter = IntCounter::with_opts(
                Opts::new(
                    "process_allocations_total",
                    "Heap allocations since the process started.",
                )
                .namespace(NAMESPACE),
            )
            .expect("static metric definition is valid");
            Self { counter, read }
        }
    }

    impl Collector for Allocations {
        fn desc(&self) -> Vec<&Desc> {
            self.counter.desc()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let (now, seen) = ((self.read)(), self.counter.get());
            self.counter.inc_by(now.saturating_sub(seen));
            self.counter.collect()
        }
    }
}

/// Registers `collector`, panicking on a duplicate name: that is a programming
/// error caught by every test that builds the registry.
pub fn register<C: Collector + 'static>(registry: &Registry, collector: C) {
    registry
        .register(Box::new(collector))
        .expect("metric names are unique within the process");
}

/// Creates and registers a counter vector named `isthmus_<name>`.
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace(NAMESPACE), labels)
        .expect("static metric definition is valid");
    register(registry, c.clone());
    c
}

/// Creates and registers a counter named `isthmus_<name>`.
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, help).namespace(NAMESPACE))
        .expect("static metric definition is valid");
    register(registry, c.clone());
    c
}

/// Creates and registers a gauge named `isthmus_<name>`.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help).namespace(NAMESPACE))
        .expect("static metric definition is valid");
    register(registry, g.clone());
    g
}

/// Creates and registers a gauge vector named `isthmus_<name>`.
pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace(NAMESPACE), labels)
        .expect("static metric definition is valid");
    register(registry, g.clone());
    g
}

/// Renders every metric in the Prometheus text format.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    // Encoding into a Vec fails only on invalid metric data, which the typed
    // constructors above rule out; an empty body is then the honest answer.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_exports_build_info_and_process_metrics_under_our_prefix() {
        let text = String::from_utf8(render(&new_registry())).unwrap();
        assert!(text.contains("isthmus_build_info{"), "{text}");
        assert!(
            text.contains("isthmus_process_resident_memory_bytes"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("isthmus_"), "{line}");
        }
    }
}
