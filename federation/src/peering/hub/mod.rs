//! The hub: this gateway's side of the federation, and the one place the
//! catalog is built.
//!
//! Discovery sources hand it this cluster's services; peering sessions hand it
//! what each peer exports. On every change it merges both (MCS rules, see
//! [`crate::catalog::merge`]) into an immutable [`Catalog`] that the data plane
//! reads through an `ArcSwap`, and publishes what this cluster exports for the
//! sessions to send. It also keeps each peer's lease: a peer that stops
//! renewing is *lapsed* (its last-known-good services are still served) and,
//! after the grace period, *expired* (its services are removed).
//!
//! By concern: `admission` (hellos and session guards), `exports` (what
//! peers export here, refusals and NACKs), `leases` (leases and
//! readiness), `bundles` (trust bundle pushes), `recompute` (the
//! catalog and the export set), `debug` (the debug views), and `record`
//! (what the hub keeps of each peer).

mod admission;
mod bundles;
mod debug;
mod exports;
mod leases;
mod recompute;
mod record;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

pub use admission::{HelloRefusal, HelloRefused, SessionGuard};
pub use bundles::BundleOutcome;
pub use debug::{CatalogServiceView, CatalogView, PeerView, PeersView, RemoteGatewayView};
pub use exports::{DeltaOutcome, ExportRefusal, Refusal};
pub use leases::LeaseState;
use record::PeerRecord;

use super::authority::{PeerAuthority, PeeringLimits, ServicePatterns};
use super::convert::PeerHello;
use super::metrics::PeeringMetrics;
use super::state;
use crate::SpiffeId;
use crate::catalog::{Catalog, Export, LocalService, PeerCatalog, ServiceKey};
use crate::trust::{PeerPolicy, TlsMaterial};

/// How often leases are checked.
const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Changes arriving this close together are merged into one catalog update.
const COALESCE: Duration = Duration::from_millis(5);

/// What this cluster exports, versioned within this process's incarnation.
#[derive(Debug, Clone, Default)]
pub struct ExportSet {
    /// Grows with every change.
    pub version: u64,
    /// The services.
    pub services: Arc<BTreeMap<ServiceKey, Export>>,
}

/// What a session sent one peer: the export set's version and, at that
/// version, the services the peer's export filter let through (the set's
/// own map, shared, when the filter lets everything through). A session
/// leaves it with the hub each time it sends, so that the next session with
/// the peer can send only what changed since (a resume), also when it starts
/// before the old one noticed its connection was gone.
#[derive(Debug, Clone, Default)]
pub struct SentView {
    /// The [`ExportSet::version`].
    pub version: u64,
    /// The services.
    pub services: Arc<BTreeMap<ServiceKey, Export>>,
}

/// The hub's mutable state, behind its one mutex ([`Hub::inner`]). The
/// mutex is held briefly and never across an `.await`; while it is held the
/// hub updates metrics and may read the export set (`/debug/peers`), but
/// takes no other lock of its own: the catalog is published, the export set
/// changed, the trust store updated and the state file written after it is
/// released.
struct Inner {
    /// By source name, as last set.
    sources: BTreeMap<String, Vec<LocalService>>,
    /// Every source's services joined; what the merge and the exports use.
    local: Vec<LocalService>,
    /// When each service was first seen exported, for sources without their
    /// own export times.
    first_exported: HashMap<ServiceKey, u64>,
    static_peers: Vec<Arc<PeerCatalog>>,
    peers: BTreeMap<SpiffeId, PeerRecord>,
    authority: Arc<PeerAuthority>,
    /// What the last recompute merged, for the next to redo only changes.
    merged: recompute::Merged,
}

/// This gateway's side of the federation; see the module docs.
pub struct Hub {
    me: PeerHello,
    grace: Duration,
    started: Instant,
    catalog: Arc<ArcSwap<Catalog>>,
    inner: Mutex<Inner>,
    exports: watch::Sender<ExportSet>,
    /// Ticks on every catalog snapshot published.
    catalog_version: watch::Sender<u64>,
    dirty: Notify,
    material: Option<Arc<TlsMaterial>>,
    limits: PeeringLimits,
    /// Who may complete a handshake on the federation listener; follows
    /// the authority.
    listener_policy: Arc<ArcSwap<PeerPolicy>>,
    /// Where this gateway's own export times are kept across restarts.
    state_file: Option<PathBuf>,
    metrics: PeeringMetrics,
}

impl Hub {
    /// A hub for the gateway `me`, publishing into `catalog`. Peers' services
    /// are served for `grace` after their lease lapses. With `material`, the
    /// hub sends this trust domain's bundle to peers and takes pushed bundles
    /// where the [`PeerAuthority`] allows. Peers are held to `limits`. With
    /// `state_file`, this gateway's export times survive restarts (read now,
    /// written on change): without it a restart makes every local export
    /// newer than what peers export, and MCS conflicts go their way.
    pub fn new(
        me: PeerHello,
        grace: Duration,
        catalog: Arc<ArcSwap<Catalog>>,
        material: Option<Arc<TlsMaterial>>,
        limits: PeeringLimits,
        state_file: Option<PathBuf>,
        metrics: PeeringMetrics,
    ) -> Arc<Self> {
        let (exports, _) = watch::channel(ExportSet::default());
        let first_exported = state_file
            .as_deref()
            .map(state::load_export_times)
            .unwrap_or_default();
        Arc::new(Self {
            me,
            grace,
            started: Instant::now(),
            catalog,
            inner: Mutex::new(Inner {
                sources: BTreeMap::new(),
                local: Vec::new(),
                first_exported,
                static_peers: Vec::new(),
                peers: BTreeMap::new(),
                authority: Arc::default(),
                merged: recompute::Merged::default(),
            }),
            exports,
            catalog_version: watch::channel(0).0,
            dirty: Notify::new(),
            material,
            limits,
            listener_policy: Arc::new(ArcSwap::from_pointee(PeerPolicy::default())),
            state_file,
            metrics,
        })
    }

    /// The limits peers are held to.
    pub fn limits(&self) -> &PeeringLimits {
        &self.limits
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// This gateway's hello.
    pub fn me(&self) -> &PeerHello {
        &self.me
    }

    /// The metrics.
    pub fn metrics(&self) -> &PeeringMetrics {
        &self.metrics
    }

    /// The catalog the data plane reads.
    pub fn catalog(&self) -> &Arc<ArcSwap<Catalog>> {
        &self.catalog
    }

    /// Ticks each time a new catalog snapshot is published.
    pub fn catalog_changes(&self) -> watch::Receiver<u64> {
        self.catalog_version.subscribe()
    }

    /// Replaces who may peer and assert what. Readiness waits for one sync
    /// with each configured peer (or for the grace period); sessions send
    /// what their peer's export patterns now let it see. Sessions already
    /// open stay, but their next message is judged by the new grants.
    pub fn set_authority(&self, authority: PeerAuthority) {
        self.listener_policy
            .store(Arc::new(authority.listener_policy()));
        self.inner().authority = Arc::new(authority);
        self.exports.send_modify(|e| e.version += 1);
    }

    /// Who may complete the TLS handshake on the federation listener: the
    /// configured peers and the gateways of accepted trust domains, kept
    /// up to date with [`Self::set_authority`].
    pub fn listener_policy(&self) -> Arc<ArcSwap<PeerPolicy>> {
        self.listener_policy.clone()
    }

    /// Who may peer and assert what.
    pub fn authority(&self) -> Arc<PeerAuthority> {
        self.inner().authority.clone()
    }

    /// What `peer` sees of this gateway's exports.
    pub fn exports_for(&self, peer: &SpiffeId) -> ServicePatterns {
        self.inner().authority.exports_for(peer).clone()
    }

    /// What this cluster exports, and its changes.
    pub fn exports(&self) -> watch::Receiver<ExportSet> {
        self.exports.subscribe()
    }

    /// Marks the catalog for a rebuild by [`Self::run`].
    fn touch(&self) {
        self.dirty.notify_one();
    }

    /// Rebuilds the catalog after peering changes and checks leases, until
    /// `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut leases = tokio::time::interval(LEASE_CHECK_INTERVAL);
        leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = self.dirty.notified() => {
                    tokio::time::sleep(COALESCE).await;
                    self.recompute();
                }
                _ = leases.tick() => self.check_leases(Instant::now()),
            }
        }
    }
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
