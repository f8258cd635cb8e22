//! Follows peer gateways' peering leases at every catalog change, so a peer
//! whose session closed or whose lease lapsed stops getting traffic (and has
//! its mesh connections cut) the moment the hub notices, not at the next probe.

use std::sync::Arc;

use isthmus_federation::peering::Hub;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::{Mutex, watch};

use super::Upstreams;

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
            self.upstreams.observe_leases(&self.hub.peer_gateways());
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
    }
}
