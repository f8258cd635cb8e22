//! The debug views: `/debug/peers` and `/debug/catalog`, as typed snapshots.
//!
//! Operators and the e2e tests read these documents, so their JSON (field
//! names, nesting, value formats and field order) is a contract: the tests
//! `debug_peers_keeps_its_shape` and `debug_catalog_keeps_its_shape` pin it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use super::Hub;
use super::leases::LeaseState;
use super::record::PeerRecord;
use crate::catalog::{Conflict, HeadlessEndpoint, RemoteGateway, ServiceEntry, ServicePort};
use crate::{ClusterName, SpiffeId};

/// `/debug/peers`: this gateway, what it exports, and every peer it knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeersView {
    /// This gateway's SPIFFE ID.
    pub gateway: SpiffeId,
    /// This gateway's cluster.
    pub cluster: ClusterName,
    /// This process's incarnation.
    pub incarnation: u64,
    /// The version of the export set.
    pub export_version: u64,
    /// The services this cluster exports, `namespace/name`.
    pub exported: Vec<String>,
    /// Every peer that opened a session (until forgotten), by SPIFFE ID.
    pub peers: Vec<PeerView>,
    /// Configured peers that never opened a session.
    pub never_connected: Vec<SpiffeId>,
}

/// One peer in [`PeersView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The cluster it speaks for.
    pub cluster: ClusterName,
    /// Its locality, as written in configuration.
    pub locality: String,
    /// Its east-west listener, if it has one.
    pub east_west: Option<SocketAddr>,
    /// Listed in `federation.peers` (rather than accepted by
    /// `federation.accept`).
    pub configured: bool,
    /// Where its lease stands.
    pub state: LeaseState,
    /// Whether its gateway gets traffic (a session open, lease renewed).
    pub live: bool,
    /// Sessions open.
    pub sessions: u32,
    /// Its incarnation, from its hello.
    pub incarnation: u64,
    /// Its lease, in milliseconds.
    pub lease_ms: u64,
    /// Its share of its cluster's traffic among the cluster's replicas.
    pub weight: u32,
    /// Milliseconds since it was last heard from.
    pub last_heard_ms_ago: u64,
    /// A snapshot of its current incarnation was applied.
    pub synced: bool,
    /// The version of its catalog applied.
    pub version: u64,
    /// The latest version of this gateway's exports it ACKed.
    pub acked_by_peer: u64,
    /// When its catalog last changed here (RFC 3339, milliseconds).
    pub last_sync: Option<String>,
    /// The services it exports here, `namespace/name`.
    pub services: Vec<String>,
    /// NACKs this gateway sent it.
    pub nacks_sent: u64,
    /// NACKs it sent this gateway.
    pub nacks_received: u64,
    /// The latest NACK, `sent: …` or `received: …`.
    pub last_nack: Option<String>,
    /// Exports refused, since its record was made.
    pub refused_exports_total: u64,
    /// The latest message's refused exports (a bounded number), by service,
    /// with the reason.
    pub refused_exports: BTreeMap<String, String>,
}

impl PeerView {
    fn of(id: &SpiffeId, r: &PeerRecord, configured: bool, now: Instant) -> Self {
        Self {
            spiffe_id: id.clone(),
            cluster: r.hello.cluster.clone(),
            locality: r.hello.locality.to_string(),
            east_west: r.hello.east_west,
            configured,
            state: r.state,
            live: r.catalog.gateway.live,
            sessions: r.sessions,
            incarnation: r.hello.incarnation,
            lease_ms: u64::try_from(r.hello.lease.as_millis()).unwrap_or(u64::MAX),
            weight: r.hello.weight,
            last_heard_ms_ago: u64::try_from(
                now.saturating_duration_since(r.last_heard).as_millis(),
            )
            .unwrap_or(u64::MAX),
            synced: r.synced,
            version: r.version,
            acked_by_peer: r.acked,
            last_sync: r
                .last_sync
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
            services: r.catalog.services.keys().map(ToString::to_string).collect(),
            nacks_sent: r.nacks_sent,
            nacks_received: r.nacks_received,
            last_nack: r.last_nack.clone(),
            refused_exports_total: r.refused_total,
            refused_exports: r.refused.clone(),
        }
    }
}

/// `/debug/catalog`: the catalog the data plane reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CatalogView {
    /// This gateway's cluster.
    pub cluster: ClusterName,
    /// Every service, in key order.
    pub services: Vec<CatalogServiceView>,
    /// Where clusters disagree on a service's definition.
    pub conflicts: Vec<Conflict>,
}

/// One service in [`CatalogView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CatalogServiceView {
    /// The service, `namespace/name`.
    pub service: String,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// Exported to peers.
    pub exported: bool,
    /// Headless: DNS publishes its endpoints.
    pub headless: bool,
    /// Its endpoints in this cluster.
    pub local_endpoints: Vec<SocketAddr>,
    /// The peer and static gateways serving it.
    pub remote: Vec<RemoteGatewayView>,
    /// The endpoints DNS publishes, for a headless service.
    pub headless_endpoints: Vec<HeadlessEndpoint>,
}

impl From<&ServiceEntry> for CatalogServiceView {
    fn from(e: &ServiceEntry) -> Self {
        Self {
            service: e.key.to_string(),
            ports: e.ports.clone(),
            exported: e.exported,
            headless: e.headless,
            local_endpoints: e.endpoints.clone(),
            remote: e.remote.iter().map(RemoteGatewayView::from).collect(),
            headless_endpoints: e.headless_endpoints.clone(),
        }
    }
}

/// One gateway serving a service, in [`CatalogServiceView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteGatewayView {
    /// The cluster behind it.
    pub cluster: ClusterName,
    /// Its SPIFFE ID.
    pub gateway: SpiffeId,
    /// Its east-west listener.
    pub address: SocketAddr,
    /// Its locality, as written in configuration.
    pub locality: String,
    /// Its share of its cluster's traffic among the cluster's replicas.
    pub weight: u32,
}

impl From<&RemoteGateway> for RemoteGatewayView {
    fn from(g: &RemoteGateway) -> Self {
        Self {
            cluster: g.cluster.clone(),
            gateway: g.spiffe_id.clone(),
            address: g.address,
            locality: g.locality.to_string(),
            weight: g.weight,
        }
    }
}

impl Hub {
    /// `/debug/peers`.
    pub fn debug_peers(&self) -> PeersView {
        let inner = self.inner();
        let now = Instant::now();
        let peers = inner
            .peers
            .iter()
            .map(|(id, r)| PeerView::of(id, r, inner.authority.is_configured(id), now))
            .collect();
        let never_connected = inner
            .authority
            .peers
            .keys()
            .filter(|id| !inner.peers.contains_key(*id))
            .cloned()
            .collect();
        let exports = self.exports.borrow();
        PeersView {
            gateway: self.me.spiffe_id.clone(),
            cluster: self.me.cluster.clone(),
            incarnation: self.me.incarnation,
            export_version: exports.version,
            exported: exports.services.keys().map(ToString::to_string).collect(),
            peers,
            never_connected,
        }
    }

    /// `/debug/catalog`, typed.
    pub fn catalog_view(&self) -> CatalogView {
        let catalog = self.catalog.load();
        CatalogView {
            cluster: self.me.cluster.clone(),
            services: catalog
                .iter()
                .map(|e| CatalogServiceView::from(e.as_ref()))
                .collect(),
            conflicts: catalog.conflicts().to_vec(),
        }
    }

    /// `/debug/catalog` as a JSON document, for callers that add to it (the
    /// admin API adds each service's clusterset IP).
    pub fn debug_catalog(&self) -> Value {
        serde_json::to_value(self.catalog_view())
            .unwrap_or_else(|e| json!({ "error": format!("cannot serialize: {e}") }))
    }
}
