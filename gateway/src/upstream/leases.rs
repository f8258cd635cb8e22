//! Follows peer gateways' peering leases at every catalog change, so a peer
//! whose session closed or whose lease lapsed stops getting traffic (and has
//! its mesh connections cut) the moment the hub notices, not at the next probe.
//!
//! Peers are followed by identity (east-west address and SPIFFE ID), read
//! from the catalog's gateways: the address alone is the peer's own claim,
//! and a lapsed lease must never touch an endpoint here or another peer that
//! shares it.

use std::sync::Arc;

use isthmus_federation::catalog::Catalog;
use isthmus_federation::peering::Hub;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::{Mutex, watch};

use super::{BackendId, BackendRef, ByBackend, Upstreams};

/// Every peer gateway serving some service in `catalog`, by identity, and
/// whether its lease is live (statically configured peers always are). A peer
/// gone from the catalog (its services expired) is no longer live.
pub fn peer_gateways(catalog: &Catalog) -> Vec<(BackendId, bool)> {
    let mut seen: ByBackend<bool> = ByBackend::default();
    for entry in catalog.iter() {
        for gw in &entry.remote {
            *seen.get_or_insert_with(BackendRef::gateway(gw.address, &gw.spiffe_id), || gw.live) &=
                gw.live;
        }
    }
    seen.iter()
        .map(|(id, live)| (id.to_owned_id(), *live))
        .collect()
}

/// A Pingora background service feeding the hub's peer gateways to
/// [`Upstreams::observe_leases`] whenever the catalog changes (every lease
/// transition rebuilds it).
pub struct LeaseWatcher {
    upstreams: Arc<Upstreams>,
    hub: Arc<Hub>,
    changes: Mutex<watch::Receiver<u64>>,
}

impl LeaseWatcher {
    /// Watches `hub`'s peers.
    pub fn new(upstreams: Arc<Upstreams>, hub: Arc<Hub>) -> Self {
        let changes = Mutex::new(hub.catalog_changes());
        Self {
            upstreams,
            hub,
            changes,
        }
    }
}

#[async_trait::async_trait]
impl BackgroundService for LeaseWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.changes.lock().await;
        loop {
            let catalog = self.hub.catalog().load();
            self.upstreams.observe_leases(&peer_gateways(&catalog));
            self.upstreams.observe_addresses(&catalog);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
    }
}
