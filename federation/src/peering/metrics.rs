//! Federation and catalog metrics, registered in the process registry.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The `kind` label of the sync metrics: a snapshot, a delta, or a delta
/// in place of the snapshot that starts a session (a resume).
const SYNC_KINDS: [&str; 3] = ["snapshot", "delta", "resume"];

/// `isthmus_federation_*` and `isthmus_catalog_*`.
#[derive(Debug, Clone)]
pub struct PeeringMetrics {
    /// Peers by state (connected, lapsed, expired).
    pub peers: IntGaugeVec,
    /// 1 while a peer has a live session, else 0.
    pub peer_up: IntGaugeVec,
    /// Sessions ended, by role and how.
    pub sessions: IntCounterVec,
    /// Snapshots and deltas, by peer, kind and direction.
    pub syncs: IntCounterVec,
    /// Their encoded bytes, by the same labels.
    pub sync_bytes: IntCounterVec,
    /// NACKs, by peer and direction.
    pub nacks: IntCounterVec,
    /// Trust bundles received from peers, by trust domain and result.
    pub bundles: IntCounterVec,
    /// Hellos and exports refused by the operator's grants and caps, and
    /// federation connections refused by the listener's caps, by reason.
    pub refused: IntCounterVec,
    /// Services in the catalog.
    pub catalog_services: IntGauge,
    /// Services this gateway exports.
    pub catalog_exported: IntGauge,
    /// Conflicts found by the last merge.
    pub catalog_conflicts: IntGauge,
    /// Catalog snapshots published.
    pub catalog_updates: prometheus::IntCounter,
}

impl PeeringMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(Opts::new(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            peers: gauge_vec(
                "isthmus_federation_peers",
                "Known peer gateways by lease state: live (renewed in time), lapsed (lease lapsed, last-known-good still served) or expired (its services removed).",
                &["state"],
            )?,
            peer_up: gauge_vec(
                "isthmus_federation_peer_up",
                "1 while the peer gateway has a live peering session, else 0.",
                &["peer", "cluster"],
            )?,
            sessions: counter_vec(
                "isthmus_federation_sessions_total",
                "Peering sessions ended, by role (client, server) and result.",
                &["role", "result"],
            )?,
            syncs: counter_vec(
                "isthmus_federation_syncs_total",
                "Catalog snapshots and deltas, by peer, kind (snapshot, delta, resume: the delta that starts a session in place of a snapshot) and direction (sent, received).",
                &["peer", "kind", "direction"],
            )?,
            sync_bytes: counter_vec(
                "isthmus_federation_sync_bytes_total",
                "Encoded bytes of catalog snapshots and deltas (the protobuf messages), by peer, kind (snapshot, delta, resume) and direction (sent, received).",
                &["peer", "kind", "direction"],
            )?,
            nacks: counter_vec(
                "isthmus_federation_nacks_total",
                "Peering messages refused, by peer and direction (sent: this gateway refused one; received: the peer did).",
                &["peer", "direction"],
            )?,
            bundles: counter_vec(
                "isthmus_federation_trust_bundles_total",
                "Trust bundles received from peers, by trust domain and result: updated, unchanged, ignored (this gateway's own trust domain), invalid, and the refusals not_opted_in, not_configured_peer, other_trust_domain, endpoint_sourced, rollback.",
                &["trust_domain", "result"],
            )?,
            refused: counter_vec(
                "isthmus_federation_refused_total",
                "Peering refused by grants and caps, by reason: not_granted, cluster, locality, address, sessions (hellos); import, services_cap (exports); connections_total, connections_per_source, handshakes (the federation listener).",
                &["reason"],
            )?,
            catalog_services: gauge(
                "isthmus_catalog_services",
                "Services in the federated catalog.",
            )?,
            catalog_exported: gauge(
                "isthmus_catalog_exported_services",
                "Services this gateway exports to its peers.",
            )?,
            catalog_conflicts: gauge(
                "isthmus_catalog_conflicts",
                "Service definitions that disagree across clusters (the oldest export wins; see /debug/catalog).",
            )?,
            catalog_updates: {
                let c = prometheus::IntCounter::with_opts(Opts::new(
                    "isthmus_catalog_updates_total",
                    "Catalog snapshots published to the data plane.",
                ))?;
                registry.register(Box::new(c.clone()))?;
                c
            },
        })
    }

    /// Drops the series of a forgotten peer.
    pub fn forget_peer(&self, peer: &str, cluster: &str) {
        let _ = self.peer_up.remove_label_values(&[peer, cluster]);
        for kind in SYNC_KINDS {
            for direction in ["sent", "received"] {
                let _ = self.syncs.remove_label_values(&[peer, kind, direction]);
                let _ = self
                    .sync_bytes
                    .remove_label_values(&[peer, kind, direction]);
            }
        }
        for direction in ["sent", "received"] {
            let _ = self.nacks.remove_label_values(&[peer, direction]);
        }
    }
}
