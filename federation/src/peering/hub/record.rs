//! What the hub keeps of each peer gateway: its hello, the catalog it
//! exports here, sync and NACK bookkeeping, and its lease.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::SentView;
use super::exports::Refusal;
use super::leases::LeaseState;
use crate::catalog::{Export, PeerCatalog, RemoteGateway, ServiceKey};
use crate::peering::convert::PeerHello;

/// What the hub knows of one peer gateway.
pub(super) struct PeerRecord {
    pub(super) hello: PeerHello,
    pub(super) catalog: Arc<PeerCatalog>,
    /// The catalog version applied, within `hello.incarnation`.
    pub(super) version: u64,
    /// A snapshot of the current incarnation was applied.
    pub(super) synced: bool,
    pub(super) first_sync: Option<SystemTime>,
    pub(super) last_sync: Option<SystemTime>,
    pub(super) last_heard: Instant,
    pub(super) sessions: u32,
    pub(super) state: LeaseState,
    pub(super) acked: u64,
    pub(super) nacks_sent: u64,
    pub(super) nacks_received: u64,
    pub(super) last_nack: Option<String>,
    /// When this gateway first saw each of the peer's exports (Unix
    /// milliseconds): the earliest export time the peer may claim for it.
    pub(super) first_seen: HashMap<ServiceKey, u64>,
    /// Exports refused from this peer, by service, with the reason (the
    /// latest message's; at most [`MAX_REFUSALS_SHOWN`] kept).
    pub(super) refused: BTreeMap<String, String>,
    /// Exports refused in all, since the record was made.
    pub(super) refused_total: u64,
    /// When its lease expired; it is forgotten a retention time later.
    pub(super) expired_at: Option<Instant>,
    /// What a session last sent it (the newest version), for the next
    /// session to resume from.
    pub(super) sent: Option<SentView>,
}

/// Refused exports `/debug/peers` lists per peer; the count has them all.
pub(super) const MAX_REFUSALS_SHOWN: usize = 32;

impl PeerRecord {
    pub(super) fn new(hello: PeerHello) -> Self {
        let catalog = Arc::new(PeerCatalog {
            gateway: gateway_of(&hello),
            services: BTreeMap::new(),
        });
        Self {
            hello,
            catalog,
            version: 0,
            synced: false,
            first_sync: None,
            last_sync: None,
            last_heard: Instant::now(),
            sessions: 0,
            state: LeaseState::Live,
            acked: 0,
            nacks_sent: 0,
            nacks_received: 0,
            last_nack: None,
            first_seen: HashMap::new(),
            refused: BTreeMap::new(),
            refused_total: 0,
            expired_at: None,
            sent: None,
        }
    }

    /// Notes the refusals of one message (replacing the previous message's).
    pub(super) fn note_refused(&mut self, refusals: &[Refusal]) {
        self.refused.clear();
        self.refused_total += refusals.len() as u64;
        for r in refusals.iter().take(MAX_REFUSALS_SHOWN) {
            self.refused
                .insert(r.service.clone(), r.error.message.clone());
        }
    }

    /// Clamps each export's claimed export time into `[first seen here,
    /// now]`: a peer can neither win an MCS conflict by claiming an older
    /// export than this gateway has seen, nor by a time in the future.
    pub(super) fn clamp_export_times(&mut self, exports: &mut [Export], now: u64) {
        for export in exports {
            let seen = *self.first_seen.entry(export.key.clone()).or_insert(now);
            export.export_time_millis = export.export_time_millis.max(seen).min(now);
        }
    }

    /// Updates whether the data plane may count on this peer: while a session
    /// is open and its lease is renewed. Returns true when that changed.
    pub(super) fn refresh_live(&mut self) -> bool {
        let live = self.state == LeaseState::Live && self.sessions > 0;
        if self.catalog.gateway.live == live {
            return false;
        }
        Arc::make_mut(&mut self.catalog).gateway.live = live;
        true
    }
}

/// The data-plane view of a peer: where its east-west listener is. A peer
/// without one exports nothing routable (address 0.0.0.0:0, never used:
/// [`Hub::recompute`](super::Hub::recompute) leaves such peers out).
pub(super) fn gateway_of(hello: &PeerHello) -> RemoteGateway {
    RemoteGateway {
        cluster: hello.cluster.clone(),
        spiffe_id: hello.spiffe_id.clone(),
        address: hello
            .east_west
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
        locality: hello.locality.clone(),
        labels: hello.labels.clone(),
        live: true,
        weight: hello.weight,
        subsets: Vec::new(),
    }
}
