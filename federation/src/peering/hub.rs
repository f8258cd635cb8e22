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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::convert::PeerHello;
use super::metrics::PeeringMetrics;
use crate::catalog::{
    Catalog, Export, LocalService, PeerCatalog, RemoteGateway, ServiceKey, export_set, merge,
};
use crate::trust::{BundleSource, DomainTrust, TlsMaterial, TrustBundle};
use crate::{SpiffeId, TrustDomain};

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

/// Which exported services a peer may see: `namespace/name` patterns where `*`
/// matches any run of characters. No patterns: all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportFilter(Vec<String>);

impl ExportFilter {
    /// A filter of `patterns`.
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    /// Whether `key` passes.
    pub fn allows(&self, key: &ServiceKey) -> bool {
        self.0.is_empty() || {
            let name = key.to_string();
            self.0.iter().any(|p| wildcard_match(p, &name))
        }
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Export filters by peer, and for peers without their own.
#[derive(Debug, Clone, Default)]
pub struct ExportFilters {
    /// For peers not listed in `by_peer`.
    pub default: ExportFilter,
    /// Per peer gateway.
    pub by_peer: BTreeMap<SpiffeId, ExportFilter>,
}

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
    fn label(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Lapsed => "lapsed",
            Self::Expired => "expired",
        }
    }
}

/// What the hub knows of one peer gateway.
struct PeerRecord {
    hello: PeerHello,
    catalog: Arc<PeerCatalog>,
    /// The catalog version applied, within `hello.incarnation`.
    version: u64,
    /// A snapshot of the current incarnation was applied.
    synced: bool,
    first_sync: Option<SystemTime>,
    last_sync: Option<SystemTime>,
    last_heard: Instant,
    sessions: u32,
    state: LeaseState,
    acked: u64,
    nacks_sent: u64,
    nacks_received: u64,
    last_nack: Option<String>,
}

impl PeerRecord {
    fn new(hello: PeerHello) -> Self {
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
        }
    }

    /// Updates whether the data plane may count on this peer: while a session
    /// is open and its lease is renewed. Returns true when that changed.
    fn refresh_live(&mut self) -> bool {
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
/// [`Hub::recompute`] leaves such peers out).
fn gateway_of(hello: &PeerHello) -> RemoteGateway {
    RemoteGateway {
        cluster: hello.cluster.clone(),
        spiffe_id: hello.spiffe_id.clone(),
        address: hello
            .east_west
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
        locality: hello.locality.clone(),
        labels: hello.labels.clone(),
        live: true,
        subsets: Vec::new(),
    }
}

/// What a delta did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// Applied.
    Applied,
    /// Already applied (another session delivered it).
    Duplicate,
    /// It does not apply to what the hub holds; a snapshot is needed.
    Resync(String),
}

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
    configured: BTreeSet<SpiffeId>,
    filters: ExportFilters,
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
    accept_peer_bundles: bool,
    metrics: PeeringMetrics,
}

impl Hub {
    /// A hub for the gateway `me`, publishing into `catalog`. Peers' services
    /// are served for `grace` after their lease lapses. With `material`, the
    /// hub sends this trust domain's bundle to peers and, if
    /// `accept_peer_bundles`, takes each peer's own trust domain's bundle.
    pub fn new(
        me: PeerHello,
        grace: Duration,
        catalog: Arc<ArcSwap<Catalog>>,
        material: Option<Arc<TlsMaterial>>,
        accept_peer_bundles: bool,
        metrics: PeeringMetrics,
    ) -> Arc<Self> {
        let (exports, _) = watch::channel(ExportSet::default());
        Arc::new(Self {
            me,
            grace,
            started: Instant::now(),
            catalog,
            inner: Mutex::new(Inner {
                sources: BTreeMap::new(),
                local: Vec::new(),
                first_exported: HashMap::new(),
                static_peers: Vec::new(),
                peers: BTreeMap::new(),
                configured: BTreeSet::new(),
                filters: ExportFilters::default(),
            }),
            exports,
            catalog_version: watch::channel(0).0,
            dirty: Notify::new(),
            material,
            accept_peer_bundles,
            metrics,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Replaces the services found by discovery source `name` and publishes
    /// the new catalog at once.
    pub fn set_source(&self, name: &str, services: Vec<LocalService>) {
        {
            let mut inner = self.inner();
            inner.sources.insert(name.to_owned(), services);
            inner.local = join_sources(&inner.sources);
            let now = unix_millis(SystemTime::now());
            let Inner {
                local,
                first_exported,
                ..
            } = &mut *inner;
            for service in local.iter_mut().filter(|s| s.exported) {
                if service.export.export_time_millis == 0 {
                    service.export.export_time_millis = *first_exported
                        .entry(service.export.key.clone())
                        .or_insert(now);
                }
            }
        }
        self.recompute();
    }

    /// Replaces the statically configured peers (gateways that do not peer).
    pub fn set_static_peers(&self, peers: Vec<PeerCatalog>) {
        self.inner().static_peers = peers.into_iter().map(Arc::new).collect();
        self.recompute();
    }

    /// Replaces the export filters; sessions send what changed.
    pub fn set_filters(&self, filters: ExportFilters) {
        self.inner().filters = filters;
        self.exports.send_modify(|e| e.version += 1);
    }

    /// The peers this gateway dials: readiness waits for one sync with each
    /// (or for the grace period).
    pub fn set_configured_peers(&self, peers: BTreeSet<SpiffeId>) {
        self.inner().configured = peers;
    }

    /// The export filter for `peer`.
    pub fn filter_for(&self, peer: &SpiffeId) -> ExportFilter {
        let inner = self.inner();
        inner
            .filters
            .by_peer
            .get(peer)
            .unwrap_or(&inner.filters.default)
            .clone()
    }

    /// Every peering peer's east-west address and whether its gateway is
    /// live (a session open and its lease renewed); expired peers and peers
    /// without an east-west listener are left out.
    pub fn peer_gateways(&self) -> Vec<(std::net::SocketAddr, bool)> {
        self.inner()
            .peers
            .values()
            .filter(|r| r.state != LeaseState::Expired)
            .filter_map(|r| Some((r.hello.east_west?, r.catalog.gateway.live)))
            .collect()
    }

    /// What this cluster exports, and its changes.
    pub fn exports(&self) -> watch::Receiver<ExportSet> {
        self.exports.subscribe()
    }

    /// Rebuilds and publishes the catalog and the export set.
    pub fn recompute(&self) {
        let inner = self.inner();
        let mut peers: Vec<&PeerCatalog> = inner.static_peers.iter().map(AsRef::as_ref).collect();
        peers.extend(
            inner
                .peers
                .values()
                .filter(|r| r.state != LeaseState::Expired && r.hello.east_west.is_some())
                .map(|r| r.catalog.as_ref()),
        );
        let catalog = merge(&self.me.cluster, &inner.local, &peers);
        let exports = export_set(&inner.local);
        drop(inner);
        self.metrics
            .catalog_services
            .set(i64::try_from(catalog.len()).unwrap_or(i64::MAX));
        self.metrics
            .catalog_conflicts
            .set(i64::try_from(catalog.conflicts().len()).unwrap_or(i64::MAX));
        self.metrics
            .catalog_exported
            .set(i64::try_from(exports.len()).unwrap_or(i64::MAX));
        self.metrics.catalog_updates.inc();
        self.catalog.store(Arc::new(catalog));
        self.catalog_version.send_modify(|v| *v += 1);
        self.exports.send_if_modified(|current| {
            if *current.services == exports {
                return false;
            }
            current.version += 1;
            current.services = Arc::new(exports);
            true
        });
    }

    /// Marks the catalog for a rebuild by [`Self::run`].
    fn touch(&self) {
        self.dirty.notify_one();
    }

    /// A session with the peer that sent `hello` began. The returned guard
    /// ends it when dropped.
    pub fn session_open(self: &Arc<Self>, hello: &PeerHello) -> SessionGuard {
        let mut inner = self.inner();
        let record = inner
            .peers
            .entry(hello.spiffe_id.clone())
            .or_insert_with(|| PeerRecord::new(hello.clone()));
        if record.hello != *hello {
            if record.hello.incarnation != hello.incarnation {
                // A restarted peer: its versions start over; what it served
                // stays until its new snapshot replaces it.
                record.synced = false;
                record.version = 0;
            }
            let services = std::mem::take(&mut Arc::make_mut(&mut record.catalog).services);
            record.catalog = Arc::new(PeerCatalog {
                gateway: gateway_of(hello),
                services,
            });
            record.hello = hello.clone();
        }
        record.sessions += 1;
        record.last_heard = Instant::now();
        record.state = LeaseState::Live;
        record.refresh_live();
        self.metrics
            .peer_up
            .with_label_values(&[hello.spiffe_id.as_str(), hello.cluster.as_str()])
            .set(1);
        drop(inner);
        self.touch();
        SessionGuard {
            hub: self.clone(),
            peer: hello.spiffe_id.clone(),
        }
    }

    fn session_closed(&self, peer: &SpiffeId) {
        let mut inner = self.inner();
        if let Some(record) = inner.peers.get_mut(peer) {
            record.sessions = record.sessions.saturating_sub(1);
            if record.sessions == 0 {
                self.metrics
                    .peer_up
                    .with_label_values(&[peer.as_str(), record.hello.cluster.as_str()])
                    .set(0);
            }
            if record.refresh_live() {
                // A closed stream is the quickest sign of a dead peer: the
                // data plane stops counting on it now, not when the lease lapses.
                info!(peer = %peer, cluster = %record.hello.cluster,
                    "last session with peer closed; its gateway gets traffic only as a last resort");
                drop(inner);
                self.touch();
            }
        }
    }

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

    /// Replaces `peer`'s services with a snapshot (of the incarnation the
    /// session saw in its hello).
    pub fn apply_snapshot(&self, peer: &PeerHello, version: u64, services: Vec<Export>) {
        let mut inner = self.inner();
        let Some(record) = inner.peers.get_mut(&peer.spiffe_id) else {
            return;
        };
        if record.hello.incarnation != peer.incarnation
            || (record.synced && version < record.version)
        {
            return; // from an older session
        }
        Arc::make_mut(&mut record.catalog).services =
            services.into_iter().map(|e| (e.key.clone(), e)).collect();
        record.version = version;
        record.synced = true;
        let now = SystemTime::now();
        record.first_sync.get_or_insert(now);
        record.last_sync = Some(now);
        drop(inner);
        self.touch();
    }

    /// Applies a delta from `base` to `version` to `peer`'s services.
    pub fn apply_delta(
        &self,
        peer: &PeerHello,
        base: u64,
        version: u64,
        upserts: Vec<Export>,
        removals: Vec<ServiceKey>,
    ) -> DeltaOutcome {
        let mut inner = self.inner();
        let Some(record) = inner.peers.get_mut(&peer.spiffe_id) else {
            return DeltaOutcome::Resync("no state for this peer".into());
        };
        if record.hello.incarnation != peer.incarnation || !record.synced {
            return DeltaOutcome::Resync("no snapshot of this incarnation yet".into());
        }
        if version <= record.version {
            return DeltaOutcome::Duplicate;
        }
        if base != record.version {
            return DeltaOutcome::Resync(format!(
                "delta from version {base} does not apply to version {}",
                record.version
            ));
        }
        let services = &mut Arc::make_mut(&mut record.catalog).services;
        for key in &removals {
            services.remove(key);
        }
        for export in upserts {
            services.insert(export.key.clone(), export);
        }
        record.version = version;
        record.last_sync = Some(SystemTime::now());
        drop(inner);
        self.touch();
        DeltaOutcome::Applied
    }

    /// Notes an ACK from `peer`.
    pub fn acked(&self, peer: &SpiffeId, version: u64) {
        if let Some(r) = self.inner().peers.get_mut(peer) {
            r.acked = r.acked.max(version);
        }
    }

    /// Notes a NACK: `sent` by this gateway or received from `peer`.
    pub fn nacked(&self, peer: &SpiffeId, sent: bool, reason: &str) {
        let direction = if sent { "sent" } else { "received" };
        self.metrics
            .nacks
            .with_label_values(&[peer.as_str(), direction])
            .inc();
        if let Some(r) = self.inner().peers.get_mut(peer) {
            if sent {
                r.nacks_sent += 1;
            } else {
                r.nacks_received += 1;
            }
            r.last_nack = Some(format!("{direction}: {reason}"));
        }
    }

    /// This trust domain's bundle in the SPIFFE format, and its revision.
    pub fn own_bundle(&self) -> Option<(u64, Vec<u8>)> {
        let material = self.material.as_ref()?;
        let store = material.trust();
        let domain = store.get(self.me.spiffe_id.trust_domain_str())?;
        Some((
            domain.revision,
            domain
                .bundle
                .to_spiffe_json(domain.bundle.sequence.unwrap_or(domain.revision), None)
                .into_bytes(),
        ))
    }

    /// A bundle `peer` sent for `trust_domain`. Taken only for the peer's own
    /// trust domain (which it proved in the handshake), never for this
    /// gateway's, and only when it is not older than the one in use.
    pub fn peer_bundle(&self, peer: &PeerHello, trust_domain: &str, data: &[u8]) -> &'static str {
        let result = self.take_peer_bundle(peer, trust_domain, data);
        self.metrics
            .bundles
            .with_label_values(&[peer.spiffe_id.trust_domain_str(), result])
            .inc();
        result
    }

    fn take_peer_bundle(&self, peer: &PeerHello, trust_domain: &str, data: &[u8]) -> &'static str {
        let Some(material) = self.material.as_ref().filter(|_| self.accept_peer_bundles) else {
            return "ignored";
        };
        let peer_td = peer.spiffe_id.trust_domain_str();
        if trust_domain != peer_td {
            warn!(peer = %peer.spiffe_id, trust_domain,
                "peer sent a bundle for a trust domain other than its own; ignored");
            return "ignored";
        }
        if peer_td == self.me.spiffe_id.trust_domain_str() {
            // A gateway of this trust domain: its bundle is ours, which only
            // local configuration sets. Routine, so not worth a warning.
            debug!(peer = %peer.spiffe_id, "bundle from a peer of this trust domain; ours stays");
            return "ignored";
        }
        let td: TrustDomain = peer.spiffe_id.trust_domain();
        let bundle = match TrustBundle::from_spiffe_json(td, data) {
            Ok(b) => b,
            Err(e) => {
                warn!(peer = %peer.spiffe_id, error = %e, "peer sent an invalid trust bundle; keeping the one in use");
                return "invalid";
            }
        };
        let store = material.trust();
        if let Some(current) = store.get(peer_td) {
            if current.bundle.authorities == bundle.authorities {
                return "unchanged";
            }
            if let (Some(got), Some(have)) = (bundle.sequence, current.bundle.sequence)
                && got < have
            {
                warn!(peer = %peer.spiffe_id, got, have, "peer sent an older trust bundle; keeping the one in use");
                return "ignored";
            }
        }
        let authorities = bundle.authorities.len();
        match DomainTrust::new(
            bundle,
            BundleSource::Peer(peer.spiffe_id.to_string()),
            material.provider(),
        ) {
            Ok(domain) => {
                material.update_trust(|s| s.with(domain.clone()));
                info!(peer = %peer.spiffe_id, trust_domain = peer_td, authorities,
                    "federated trust bundle updated by its peer gateway");
                "updated"
            }
            Err(e) => {
                warn!(peer = %peer.spiffe_id, error = %e, "peer sent an unusable trust bundle");
                "invalid"
            }
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
                    Arc::make_mut(&mut record.catalog).services.clear();
                    changed = true;
                }
                _ => {}
            }
        }
        let mut counts: BTreeMap<&str, i64> = [("live", 0), ("lapsed", 0), ("expired", 0)].into();
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

    /// Readiness: every configured peer synced once, or the grace period
    /// since start is over. The detail names the peers still awaited.
    pub fn readiness(&self) -> (bool, String) {
        let inner = self.inner();
        let waiting: Vec<String> = inner
            .configured
            .iter()
            .filter(|id| inner.peers.get(*id).is_none_or(|r| r.first_sync.is_none()))
            .map(ToString::to_string)
            .collect();
        if waiting.is_empty() {
            return (
                true,
                format!("synced with {} configured peers", inner.configured.len()),
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

    /// `/debug/peers`.
    pub fn debug_peers(&self) -> Value {
        let inner = self.inner();
        let now = Instant::now();
        let peers: Vec<Value> = inner
            .peers
            .iter()
            .map(|(id, r)| {
                json!({
                    "spiffe_id": id,
                    "cluster": r.hello.cluster,
                    "locality": r.hello.locality.to_string(),
                    "east_west": r.hello.east_west.map(|a| a.to_string()),
                    "configured": inner.configured.contains(id),
                    "state": r.state,
                    // Whether its gateway gets traffic (a session open, lease renewed).
                    "live": r.catalog.gateway.live,
                    "sessions": r.sessions,
                    "incarnation": r.hello.incarnation,
                    "lease_ms": u64::try_from(r.hello.lease.as_millis()).unwrap_or(u64::MAX),
                    "last_heard_ms_ago": u64::try_from(now.saturating_duration_since(r.last_heard).as_millis()).unwrap_or(u64::MAX),
                    "synced": r.synced,
                    "version": r.version,
                    "acked_by_peer": r.acked,
                    "last_sync": r.last_sync.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                    "services": r.catalog.services.keys().map(ToString::to_string).collect::<Vec<_>>(),
                    "nacks_sent": r.nacks_sent,
                    "nacks_received": r.nacks_received,
                    "last_nack": r.last_nack,
                })
            })
            .collect();
        let waiting: Vec<&SpiffeId> = inner
            .configured
            .iter()
            .filter(|id| !inner.peers.contains_key(*id))
            .collect();
        let exports = self.exports.borrow();
        json!({
            "gateway": self.me.spiffe_id,
            "cluster": self.me.cluster,
            "incarnation": self.me.incarnation,
            "export_version": exports.version,
            "exported": exports.services.keys().map(ToString::to_string).collect::<Vec<_>>(),
            "peers": peers,
            "never_connected": waiting,
        })
    }

    /// `/debug/catalog`.
    pub fn debug_catalog(&self) -> Value {
        let catalog = self.catalog.load();
        json!({
            "cluster": self.me.cluster,
            "services": catalog.iter().map(|e| json!({
                "service": e.key.to_string(),
                "ports": e.ports,
                "exported": e.exported,
                "headless": e.headless,
                "local_endpoints": e.endpoints,
                "remote": e.remote.iter().map(|g| json!({
                    "cluster": g.cluster,
                    "gateway": g.spiffe_id,
                    "address": g.address,
                    "locality": g.locality.to_string(),
                })).collect::<Vec<_>>(),
                "headless_endpoints": e.headless_endpoints,
            })).collect::<Vec<_>>(),
            "conflicts": catalog.conflicts(),
        })
    }
}

/// Ends a session in the hub when dropped.
pub struct SessionGuard {
    hub: Arc<Hub>,
    peer: SpiffeId,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.hub.session_closed(&self.peer);
    }
}

/// Joins every source's services; a service found by several sources gets
/// all their endpoints and ports (the first source's definition otherwise).
fn join_sources(sources: &BTreeMap<String, Vec<LocalService>>) -> Vec<LocalService> {
    let mut joined: BTreeMap<ServiceKey, LocalService> = BTreeMap::new();
    for service in sources.values().flatten() {
        match joined.get_mut(&service.export.key) {
            None => {
                joined.insert(service.export.key.clone(), service.clone());
            }
            Some(into) => {
                for e in &service.endpoints {
                    if !into.endpoints.contains(e) {
                        into.endpoints.push(*e);
                    }
                }
                for p in &service.export.ports {
                    if !into.export.ports.iter().any(|q| q.port == p.port) {
                        into.export.ports.push(p.clone());
                    }
                }
                into.export
                    .endpoints
                    .extend(service.export.endpoints.iter().cloned());
                into.exported |= service.exported;
            }
        }
    }
    joined.into_values().collect()
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_namespace_name() {
        let key = |s: &str| s.parse::<ServiceKey>().unwrap();
        let f = ExportFilter::new(vec!["shop/*".into(), "*/api".into(), "a*c/x".into()]);
        assert!(f.allows(&key("shop/web")));
        assert!(f.allows(&key("other/api")));
        assert!(f.allows(&key("abbc/x")));
        assert!(!f.allows(&key("other/web")));
        assert!(!f.allows(&key("ab/x")));
        assert!(!f.allows(&key("shops/web")));
        assert!(ExportFilter::default().allows(&key("any/thing")));
        assert!(wildcard_match("*", "x"));
        assert!(wildcard_match("a*a", "aa"));
        assert!(!wildcard_match("a*a", "a"));
    }

    fn hello(name: &str, incarnation: u64) -> PeerHello {
        PeerHello {
            spiffe_id: format!("spiffe://{name}.example/isthmus/gateway/gw")
                .parse()
                .unwrap(),
            cluster: name.parse().unwrap(),
            locality: "r".parse().unwrap(),
            east_west: Some(([127, 0, 0, 9], 15443).into()),
            incarnation,
            lease: Duration::from_millis(500),
            labels: Default::default(),
        }
    }

    fn export(key: &str) -> Export {
        Export {
            key: key.parse().unwrap(),
            ports: vec![crate::catalog::ServicePort {
                port: 80,
                protocol: crate::catalog::Protocol::Http,
                name: None,
            }],
            export_time_millis: 1,
            headless: false,
            endpoints: vec![],
            subsets: vec!["v2".into()],
        }
    }

    /// Whether the peer gateway serving shop/web is live in the catalog.
    fn live(hub: &Hub) -> Option<bool> {
        let catalog = hub.catalog().load();
        let entry = catalog.get(&"shop/web".parse().unwrap())?;
        Some(entry.remote.first()?.live)
    }

    #[test]
    fn a_peer_is_live_while_a_session_is_open_and_its_lease_renewed() {
        let metrics = PeeringMetrics::new(&prometheus::Registry::new()).unwrap();
        let hub = Hub::new(
            hello("me", 1),
            Duration::from_secs(30),
            Arc::new(ArcSwap::default()),
            None,
            false,
            metrics,
        );
        let peer = hello("west", 7);
        let session = hub.session_open(&peer);
        hub.apply_snapshot(&peer, 1, vec![export("shop/web")]);
        hub.recompute();
        assert_eq!(live(&hub), Some(true));
        let catalog = hub.catalog().load();
        let gw = &catalog.get(&"shop/web".parse().unwrap()).unwrap().remote[0];
        assert_eq!(gw.subsets, ["v2"], "the peer's announced subsets");

        // The stream closes: not live at once, though its services stay.
        drop(session);
        hub.recompute();
        assert_eq!(live(&hub), Some(false));

        // Back, then silent past its lease: lapsed, not live; services kept
        // for the grace period.
        let session = hub.session_open(&peer);
        hub.recompute();
        assert_eq!(live(&hub), Some(true));
        hub.check_leases(Instant::now() + Duration::from_secs(1));
        assert_eq!(live(&hub), Some(false));
        hub.heard(&peer.spiffe_id);
        hub.recompute();
        assert_eq!(live(&hub), Some(true));
        drop(session);
    }
}
