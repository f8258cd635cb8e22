//! Follows peer gateways' peering leases in every new catalog, so a peer whose
//! session closed or whose lease lapsed stops getting traffic (and has its
//! mesh connections cut) the moment the hub notices, not at the next probe.

use std::sync::Arc;

use arc_swap::ArcSwap;
use isthmus_federation::catalog::Catalog;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::{Mutex, watch};

use super::Upstreams;

/// A Pingora background service feeding catalog changes to
/// [`Upstreams::observe_leases`].
pub struct LeaseWatcher {
    upstreams: Arc<Upstreams>,
    catalog: Arc<ArcSwap<Catalog>>,
    changes: Mutex<watch::Receiver<u64>>,
}

impl LeaseWatcher {
    /// Watches `catalog`, which `changes` announces.
    pub fn new(
        upstreams: Arc<Upstreams>,
        catalog: Arc<ArcSwap<Catalog>>,
        changes: watch::Receiver<u64>,
    ) -> Self {
        Self {
            upstreams,
            catalog,
            changes: Mutex::new(changes),
        }
    }
}

#[async_trait::async_trait]
impl BackgroundService for LeaseWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.changes.lock().await;
        loop {
            self.upstreams.observe_leases(&self.catalog.load());
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
    }
}
