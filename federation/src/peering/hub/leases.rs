//! Leases: a peer that stops renewing is lapsed, then expired and, after
//! the retention time, forgotten; and readiness, which waits for a first
//! sync with each configured peer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tracing::{info, warn};

use super::Hub;
use crate::SpiffeId;

/// Where a peer's lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Renewed in time.
    Live,
    /// Not renewed in time; its services are still served until the grace
    /// period is over.
    Lapsed,
    /// Gone for longer than the grace period; its services were removed.
    Expired,
}

impl LeaseState {
    /// Every state, for the gauge and tests.
    pub const ALL: [Self; 3] = [Self::Live, Self::Lapsed, Self::Expired];

    /// The `state` label of `isthmus_federation_peers`, and the state's name
    /// in `/debug/peers`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Lapsed => "lapsed",
            Self::Expired => "expired",
        }
    }
}

impl Hub {
    /// `peer` sent something: its lease is renewed.
    pub fn heard(&self, peer: &SpiffeId) {
        let mut inner = self.inner();
        let Some(record) = inner.peers.get_mut(peer) else {
            return;
        };
        record.last_heard = Instant::now();
        if record.state != LeaseState::Live {
            info!(peer = %peer, cluster = %record.hello.cluster, "peer lease renewed");
            record.state = LeaseState::Live;
            record.refresh_live();
            drop(inner);
            self.touch();
        }
    }

    /// Moves leases along: live → lapsed when not renewed in time, lapsed →
    /// expired (services removed) after the grace period.
    pub fn check_leases(&self, now: Instant) {
        let mut changed = false;
        let mut inner = self.inner();
        for (id, record) in &mut inner.peers {
            let deadline = record.last_heard + record.hello.lease;
            match record.state {
                LeaseState::Live if now > deadline => {
                    warn!(peer = %id, cluster = %record.hello.cluster,
                        grace = %humantime::format_duration(self.grace),
                        "peer lease lapsed; serving its last-known-good services for the grace period");
                    record.state = LeaseState::Lapsed;
                    record.refresh_live();
                    changed = true;
                }
                LeaseState::Lapsed if now > deadline + self.grace => {
                    warn!(peer = %id, cluster = %record.hello.cluster,
                        services = record.catalog.services.len(),
                        "peer expired; its services are removed");
                    record.state = LeaseState::Expired;
                    record.synced = false;
                    record.expired_at = Some(now);
                    record.first_seen.clear();
                    Arc::make_mut(&mut record.catalog).services.clear();
                    changed = true;
                }
                _ => {}
            }
        }
        // Expired peers are remembered for a while (for /debug/peers and
        // their metric series), then forgotten, so that peers come and gone
        // do not grow this gateway's memory and metrics for ever.
        let retention = self.limits.peer_retention;
        let forget: Vec<SpiffeId> = inner
            .peers
            .iter()
            .filter(|(_, r)| r.sessions == 0 && r.expired_at.is_some_and(|t| now > t + retention))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &forget {
            if let Some(record) = inner.peers.remove(id) {
                info!(peer = %id, cluster = %record.hello.cluster, "expired peer forgotten");
                self.metrics
                    .forget_peer(id.as_str(), record.hello.cluster.as_str());
            }
        }
        let mut counts: BTreeMap<&str, i64> = LeaseState::ALL.map(|s| (s.label(), 0)).into();
        for record in inner.peers.values() {
            *counts.entry(record.state.label()).or_default() += 1;
        }
        drop(inner);
        for (state, n) in counts {
            self.metrics.peers.with_label_values(&[state]).set(n);
        }
        if changed {
            self.recompute();
        }
    }

    /// Readiness: every configured peer synced once, or the grace period
    /// since start is over. The detail names the peers still awaited.
    pub fn readiness(&self) -> (bool, String) {
        let inner = self.inner();
        let configured = &inner.authority.peers;
        let waiting: Vec<String> = configured
            .keys()
            .filter(|id| inner.peers.get(*id).is_none_or(|r| r.first_sync.is_none()))
            .map(ToString::to_string)
            .collect();
        if waiting.is_empty() {
            return (
                true,
                format!("synced with {} configured peers", configured.len()),
            );
        }
        if self.started.elapsed() > self.grace {
            return (
                true,
                format!("grace period over; not yet synced: {}", waiting.join(", ")),
            );
        }
        (
            false,
            format!("waiting for a first sync with {}", waiting.join(", ")),
        )
    }
}
