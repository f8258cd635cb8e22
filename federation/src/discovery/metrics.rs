//! `isthmus_discovery_*`: what each discovery source found and how often its
//! input was unusable.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

crate::label_enum! {
    /// Which input a source could not use: the `kind` label of
    /// `isthmus_discovery_errors_total`.
    pub enum FailureKind {
        /// A file source could not read its file.
        Read => "read",
        /// A file source's file is not a valid service list.
        Invalid => "invalid",
        /// A file source lost its watch, or a Kubernetes watch failed.
        Watch => "watch",
        /// A DNS source's name did not resolve.
        Resolve => "resolve",
        /// A DNS source could not build its resolvers.
        Resolvers => "resolvers",
        /// A Kubernetes source could not build its client.
        Client => "client",
        /// A Kubernetes source's initial list failed.
        List => "list",
        /// A Kubernetes watch expired (410 Gone); the source lists again.
        Gone => "gone",
    }
}

/// Discovery metrics, labelled by source (`<kind>:<id>`).
#[derive(Debug, Clone)]
pub struct DiscoveryMetrics {
    /// Services in the source's current view.
    pub services: IntGaugeVec,
    /// Endpoints in the source's current view.
    pub endpoints: IntGaugeVec,
    /// Views published (each one changed something).
    pub updates: IntCounterVec,
    /// Inputs the source could not use, by kind; the last good view stayed.
    pub errors: IntCounterVec,
}

impl DiscoveryMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["source"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        Ok(Self {
            services: gauge(
                "isthmus_discovery_services",
                "Services in each discovery source's current view.",
            )?,
            endpoints: gauge(
                "isthmus_discovery_endpoints",
                "Endpoints in each discovery source's current view.",
            )?,
            updates: counter(
                "isthmus_discovery_updates_total",
                "Views published by each discovery source (each changed something).",
                &["source"],
            )?,
            errors: counter(
                "isthmus_discovery_errors_total",
                "Inputs a discovery source could not use, by kind (read, invalid, watch, resolve, resolvers, client, list, gone); its last good view stayed published.",
                &["source", "kind"],
            )?,
        })
    }
}
