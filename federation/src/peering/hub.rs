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

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::authority::{PeerAuthority, PeeringLimits, ServicePatterns};
use super::convert::{ConvertError, PeerHello};
use super::metrics::PeeringMetrics;
use super::state;
use crate::catalog::{
    Catalog, Export, LocalService, PeerCatalog, RemoteGateway, ServiceKey, export_set, merge,
};
use crate::trust::{BundleSource, DomainTrust, PeerPolicy, TlsMaterial, TrustBundle};
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
    /// When this gateway first saw each of the peer's exports (Unix
    /// milliseconds): the earliest export time the peer may claim for it.
    first_seen: HashMap<ServiceKey, u64>,
    /// Exports refused from this peer, by service, with the reason (the
    /// latest message's; at most [`MAX_REFUSALS_SHOWN`] kept).
    refused: BTreeMap<String, String>,
    /// Exports refused in all, since the record was made.
    refused_total: u64,
    /// When its lease expired; it is forgotten a retention time later.
    expired_at: Option<Instant>,
}

/// Refused exports `/debug/peers` lists per peer; the count has them all.
const MAX_REFUSALS_SHOWN: usize = 32;

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
            first_seen: HashMap::new(),
            refused: BTreeMap::new(),
            refused_total: 0,
            expired_at: None,
        }
    }

    /// Notes the refusals of one message (replacing the previous message's).
    fn note_refused(&mut self, refusals: &[Refusal]) {
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
    fn clamp_export_times(&mut self, exports: &mut [Export], now: u64) {
        for export in exports {
            let seen = *self.first_seen.entry(export.key.clone()).or_insert(now);
            export.export_time_millis = export.export_time_millis.max(seen).min(now);
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
    authority: Arc<PeerAuthority>,
}

/// An export a peer sent that this gateway did not take.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The service, `namespace/name`.
    pub service: String,
    /// The metric label: `import` (outside the peer's grant) or
    /// `services_cap` (over the services a peer may export).
    pub reason: &'static str,
    /// What the NACK says.
    pub error: ConvertError,
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
        let save = {
            let mut inner = self.inner();
            inner.sources.insert(name.to_owned(), services);
            inner.local = join_sources(&inner.sources);
            let now = unix_millis(SystemTime::now());
            let Inner {
                local,
                first_exported,
                ..
            } = &mut *inner;
            let before = first_exported.clone();
            // Only what is exported now is kept: a service exported again
            // later is a new export.
            first_exported.retain(|key, _| {
                local
                    .iter()
                    .any(|s| s.exported && s.export.export_time_millis == 0 && &s.export.key == key)
            });
            for service in local.iter_mut().filter(|s| s.exported) {
                if service.export.export_time_millis == 0 {
                    service.export.export_time_millis = *first_exported
                        .entry(service.export.key.clone())
                        .or_insert(now);
                }
            }
            (*first_exported != before).then(|| first_exported.clone())
        };
        if let (Some(times), Some(path)) = (save, &self.state_file) {
            state::save_export_times(path, &times);
        }
        self.recompute();
    }

    /// Replaces the statically configured peers (gateways that do not peer).
    pub fn set_static_peers(&self, peers: Vec<PeerCatalog>) {
        self.inner().static_peers = peers.into_iter().map(Arc::new).collect();
        self.recompute();
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
    pub fn session_open(self: &Arc<Self>, hello: &PeerHello) -> Result<SessionGuard, HelloRefused> {
        let mut inner = self.inner();
        if let Err(refused) = self.admit(&inner, hello) {
            drop(inner);
            warn!(peer = %hello.spiffe_id, cluster = %hello.cluster, reason = refused.reason,
                error = %refused.message, "peer hello refused");
            self.metrics
                .refused
                .with_label_values(&[refused.reason])
                .inc();
            return Err(refused);
        }
        let record = inner
            .peers
            .entry(hello.spiffe_id.clone())
            .or_insert_with(|| PeerRecord::new(hello.clone()));
        record.expired_at = None;
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
        Ok(SessionGuard {
            hub: self.clone(),
            peer: hello.spiffe_id.clone(),
        })
    }

    /// Whether the operator's grants let `hello` open a session: a grant for
    /// its identity, a cluster name the grant names, an east-west address
    /// that is nobody else's, and room for one more session.
    fn admit(&self, inner: &Inner, hello: &PeerHello) -> Result<(), HelloRefused> {
        let id = &hello.spiffe_id;
        let Some(grant) = inner.authority.grant(id) else {
            return Err(HelloRefused::new(
                "not_granted",
                format!("{id} is neither in federation.peers nor accepted by federation.accept"),
            ));
        };
        if !grant.clusters.contains(&hello.cluster) {
            let allowed: Vec<&str> = grant.clusters.iter().map(|c| c.as_str()).collect();
            return Err(HelloRefused::new(
                "cluster",
                format!(
                    "{id} may speak for cluster(s) {} only, not {:?}",
                    allowed.join(", "),
                    hello.cluster.as_str()
                ),
            ));
        }
        if !grant.localities.is_empty()
            && !grant.localities.iter().any(|l| hello.locality.is_within(l))
        {
            let allowed: Vec<String> = grant.localities.iter().map(ToString::to_string).collect();
            return Err(HelloRefused::new(
                "locality",
                format!(
                    "{id} may run in {} only, not {}",
                    allowed.join(", "),
                    hello.locality
                ),
            ));
        }
        if let Some(address) = hello.east_west
            && let Some(owner) = address_owner(inner, &self.me, id, address)
        {
            return Err(HelloRefused::new(
                "address",
                format!("east-west address {address} is {owner}'s"),
            ));
        }
        let open = inner.peers.get(id).map_or(0, |r| r.sessions);
        if open >= self.limits.max_sessions_per_peer {
            return Err(HelloRefused::new(
                "sessions",
                format!(
                    "{id} holds {open} sessions already; at most {}",
                    self.limits.max_sessions_per_peer
                ),
            ));
        }
        Ok(())
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
    /// Returns the exports refused (outside the peer's grant or over its
    /// cap), for the NACK.
    pub fn apply_snapshot(
        &self,
        peer: &PeerHello,
        version: u64,
        services: Vec<Export>,
    ) -> Vec<Refusal> {
        let mut inner = self.inner();
        let authority = inner.authority.clone();
        let Some(record) = inner.peers.get_mut(&peer.spiffe_id) else {
            return Vec::new();
        };
        if record.hello.incarnation != peer.incarnation
            || (record.synced && version < record.version)
        {
            return Vec::new(); // from an older session
        }
        let (mut taken, refused) = authorize(
            authority.grant(&peer.spiffe_id).map(|g| &g.imports),
            services,
            self.limits.max_services_per_peer,
            |_| false,
        );
        let now_millis = unix_millis(SystemTime::now());
        record
            .first_seen
            .retain(|key, _| taken.iter().any(|e| &e.key == key));
        record.clamp_export_times(&mut taken, now_millis);
        record.note_refused(&refused);
        Arc::make_mut(&mut record.catalog).services =
            taken.into_iter().map(|e| (e.key.clone(), e)).collect();
        record.version = version;
        record.synced = true;
        let now = SystemTime::now();
        record.first_sync.get_or_insert(now);
        record.last_sync = Some(now);
        drop(inner);
        self.count_refused(&refused);
        self.touch();
        refused
    }

    fn count_refused(&self, refused: &[Refusal]) {
        for r in refused {
            self.metrics.refused.with_label_values(&[r.reason]).inc();
        }
    }

    /// Applies a delta from `base` to `version` to `peer`'s services. The
    /// refusals (outside its grant, over its cap) are for the NACK.
    pub fn apply_delta(
        &self,
        peer: &PeerHello,
        base: u64,
        version: u64,
        upserts: Vec<Export>,
        removals: Vec<ServiceKey>,
    ) -> (DeltaOutcome, Vec<Refusal>) {
        let mut inner = self.inner();
        let authority = inner.authority.clone();
        let Some(record) = inner.peers.get_mut(&peer.spiffe_id) else {
            return (
                DeltaOutcome::Resync("no state for this peer".into()),
                Vec::new(),
            );
        };
        if record.hello.incarnation != peer.incarnation || !record.synced {
            return (
                DeltaOutcome::Resync("no snapshot of this incarnation yet".into()),
                Vec::new(),
            );
        }
        if version <= record.version {
            return (DeltaOutcome::Duplicate, Vec::new());
        }
        if base != record.version {
            return (
                DeltaOutcome::Resync(format!(
                    "delta from version {base} does not apply to version {}",
                    record.version
                )),
                Vec::new(),
            );
        }
        for key in &removals {
            Arc::make_mut(&mut record.catalog).services.remove(key);
            record.first_seen.remove(key);
        }
        // Updates of services it holds always fit; new ones only while the
        // peer is under its cap.
        let held = record.catalog.services.len();
        let room = self.limits.max_services_per_peer.saturating_sub(held);
        let services = &record.catalog.services;
        let (mut taken, refused) = authorize(
            authority.grant(&peer.spiffe_id).map(|g| &g.imports),
            upserts,
            room,
            |key| services.contains_key(key),
        );
        record.clamp_export_times(&mut taken, unix_millis(SystemTime::now()));
        record.note_refused(&refused);
        let services = &mut Arc::make_mut(&mut record.catalog).services;
        for export in taken {
            services.insert(export.key.clone(), export);
        }
        record.version = version;
        record.last_sync = Some(SystemTime::now());
        drop(inner);
        self.count_refused(&refused);
        self.touch();
        (DeltaOutcome::Applied, refused)
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

    /// A bundle `peer` sent for `trust_domain`. Taken only where the
    /// operator opted that trust domain in to pushes, from a configured peer
    /// of that trust domain (which it proved in the handshake), never for
    /// this gateway's own, never over a bundle that came from an endpoint, and
    /// never older than the one in use. Returns the metric label.
    pub fn peer_bundle(&self, peer: &PeerHello, trust_domain: &str, data: &[u8]) -> &'static str {
        let result = self.take_peer_bundle(peer, trust_domain, data);
        self.metrics
            .bundles
            .with_label_values(&[peer.spiffe_id.trust_domain_str(), result])
            .inc();
        result
    }

    fn take_peer_bundle(&self, peer: &PeerHello, trust_domain: &str, data: &[u8]) -> &'static str {
        let Some(material) = self.material.as_ref() else {
            return "ignored";
        };
        let peer_td = peer.spiffe_id.trust_domain_str();
        if peer_td == self.me.spiffe_id.trust_domain_str() && trust_domain == peer_td {
            // A gateway of this trust domain: its bundle is ours, which only
            // local configuration sets. Routine, so not worth a warning.
            debug!(peer = %peer.spiffe_id, "bundle from a peer of this trust domain; ours stays");
            return "ignored";
        }
        let refuse = |result: &'static str, why: &str| {
            warn!(peer = %peer.spiffe_id, trust_domain, result, "peer's trust bundle refused: {why}");
            result
        };
        if trust_domain != peer_td {
            return refuse(
                "other_trust_domain",
                "a peer may push only its own trust domain's bundle",
            );
        }
        let authority = self.authority();
        if !authority.bundle_pushes.contains(peer_td) {
            return refuse(
                "not_opted_in",
                "this trust domain's bundle comes from its configured source only \
                 (opt in with trust.federated[].accept_peer_bundles)",
            );
        }
        if !authority.is_configured(&peer.spiffe_id) {
            return refuse(
                "not_configured_peer",
                "only peers listed in federation.peers may push bundles",
            );
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
            if matches!(current.source, BundleSource::Endpoint(_)) {
                return refuse(
                    "endpoint_sourced",
                    "the bundle in use comes from its bundle endpoint",
                );
            }
            if current.bundle.authorities == bundle.authorities {
                return "unchanged";
            }
            if let Some(have) = current.bundle.sequence {
                match bundle.sequence {
                    Some(got) if got >= have => {}
                    got => {
                        warn!(peer = %peer.spiffe_id, ?got, have,
                            "peer sent a bundle with an older or no spiffe_sequence; keeping the one in use");
                        return "rollback";
                    }
                }
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
                    "configured": inner.authority.is_configured(id),
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
                    "refused_exports_total": r.refused_total,
                    "refused_exports": r.refused,
                })
            })
            .collect();
        let waiting: Vec<&SpiffeId> = inner
            .authority
            .peers
            .keys()
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

/// Why a peer's hello was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRefused {
    /// The metric label: `not_granted`, `cluster`, `locality`, `address` or
    /// `sessions`.
    pub reason: &'static str,
    /// What the NACK and the log say.
    pub message: String,
}

impl HelloRefused {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// Who besides `peer` owns `address`: this gateway's own east-west
/// listener, a local endpoint, a static peer or another live peer. Backend
/// state follows addresses, so a peer announcing someone else's would have
/// its failures cut them.
fn address_owner(
    inner: &Inner,
    me: &PeerHello,
    peer: &SpiffeId,
    address: std::net::SocketAddr,
) -> Option<String> {
    if me.east_west == Some(address) {
        return Some("this gateway".into());
    }
    if let Some(s) = inner.local.iter().find(|s| s.endpoints.contains(&address)) {
        return Some(format!("an endpoint of local service {}", s.export.key));
    }
    if let Some(p) = inner
        .static_peers
        .iter()
        .find(|p| p.gateway.address == address)
    {
        return Some(format!("static peer {}", p.gateway.spiffe_id));
    }
    inner
        .peers
        .iter()
        .find(|(other, r)| {
            *other != peer && r.state != LeaseState::Expired && r.hello.east_west == Some(address)
        })
        .map(|(other, _)| format!("peer {other}"))
}

/// Ends a session in the hub when dropped.
pub struct SessionGuard {
    hub: Arc<Hub>,
    peer: SpiffeId,
}

impl std::fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGuard")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.hub.session_closed(&self.peer);
    }
}

/// Splits `exports` into those `imports` lets a peer export here (`None`:
/// the peer has no grant any more) and the refused ones. At most `room`
/// services not yet `held` are taken; the rest are over the peer's cap.
fn authorize(
    imports: Option<&ServicePatterns>,
    exports: Vec<Export>,
    mut room: usize,
    held: impl Fn(&ServiceKey) -> bool,
) -> (Vec<Export>, Vec<Refusal>) {
    let mut taken = Vec::with_capacity(exports.len().min(room));
    let mut refused = Vec::new();
    let refuse = |export: Export, reason: &'static str, message: String| Refusal {
        service: export.key.to_string(),
        reason,
        error: ConvertError {
            path: export.key.to_string(),
            message,
        },
    };
    for export in exports {
        match imports {
            None => refused.push(refuse(
                export,
                "not_granted",
                "this peer is no longer granted any imports".into(),
            )),
            Some(imports) if !imports.allows(&export.key) => refused.push(refuse(
                export,
                "import",
                "not among the services this gateway imports from this peer".into(),
            )),
            Some(_) if held(&export.key) => taken.push(export),
            Some(_) if room == 0 => refused.push(refuse(
                export,
                "services_cap",
                "over the number of services this peer may export here".into(),
            )),
            Some(_) => {
                room -= 1;
                taken.push(export);
            }
        }
    }
    (taken, refused)
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
    use crate::peering::authority::Grant;

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

    fn me() -> PeerHello {
        PeerHello {
            east_west: Some(([127, 0, 0, 1], 15443).into()),
            ..hello("me", 1)
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

    /// A hub for `me` that grants each of `peers` its own cluster (named as
    /// the peer) and `imports`.
    fn hub_with(peers: &[&PeerHello], imports: &[&str], limits: PeeringLimits) -> Arc<Hub> {
        let metrics = PeeringMetrics::new(&prometheus::Registry::new()).unwrap();
        let hub = Hub::new(
            me(),
            Duration::from_secs(30),
            Arc::new(ArcSwap::default()),
            None,
            limits,
            None,
            metrics,
        );
        hub.set_authority(PeerAuthority {
            peers: peers
                .iter()
                .map(|p| {
                    let grant = Grant {
                        clusters: [p.cluster.clone()].into(),
                        localities: vec![],
                        imports: ServicePatterns::new(
                            imports.iter().map(|s| (*s).to_owned()).collect(),
                        ),
                        exports: None,
                    };
                    (p.spiffe_id.clone(), grant)
                })
                .collect(),
            ..PeerAuthority::default()
        });
        hub
    }

    fn refused(hub: &Hub, reason: &str) -> u64 {
        hub.metrics().refused.with_label_values(&[reason]).get()
    }

    /// Whether the peer gateway serving shop/web is live in the catalog.
    fn live(hub: &Hub) -> Option<bool> {
        let catalog = hub.catalog().load();
        let entry = catalog.get(&"shop/web".parse().unwrap())?;
        Some(entry.remote.first()?.live)
    }

    #[test]
    fn a_peer_is_live_while_a_session_is_open_and_its_lease_renewed() {
        let peer = hello("west", 7);
        let hub = hub_with(&[&peer], &[], PeeringLimits::default());
        let session = hub.session_open(&peer).unwrap();
        assert!(
            hub.apply_snapshot(&peer, 1, vec![export("shop/web")])
                .is_empty()
        );
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
        let session = hub.session_open(&peer).unwrap();
        hub.recompute();
        assert_eq!(live(&hub), Some(true));
        hub.check_leases(Instant::now() + Duration::from_secs(1));
        assert_eq!(live(&hub), Some(false));
        hub.heard(&peer.spiffe_id);
        hub.recompute();
        assert_eq!(live(&hub), Some(true));
        drop(session);
    }

    #[test]
    fn a_hello_outside_its_grant_is_refused() {
        let west = hello("west", 1);
        let hub = hub_with(&[&west], &[], PeeringLimits::default());

        // Not granted at all.
        let stranger = hello("east", 1);
        assert_eq!(
            hub.session_open(&stranger).unwrap_err().reason,
            "not_granted"
        );

        // Granted, but claiming another cluster.
        let mut spoof = west.clone();
        spoof.cluster = "east".parse().unwrap();
        let err = hub.session_open(&spoof).unwrap_err();
        assert_eq!(err.reason, "cluster");
        assert!(err.message.contains("west"), "{}", err.message);
        assert_eq!(refused(&hub, "cluster"), 1);
        assert!(hub.debug_peers()["peers"].as_array().unwrap().is_empty());

        // Its own cluster: admitted.
        let _ok = hub.session_open(&west).unwrap();
    }

    #[test]
    fn a_hello_outside_its_granted_localities_is_refused() {
        let west = hello("west", 1);
        let hub = hub_with(&[&west], &[], PeeringLimits::default());
        hub.set_authority(PeerAuthority {
            peers: [(
                west.spiffe_id.clone(),
                Grant {
                    clusters: [west.cluster.clone()].into(),
                    localities: vec!["eu-west".parse().unwrap()],
                    ..Grant::default()
                },
            )]
            .into(),
            ..PeerAuthority::default()
        });
        // Claims this gateway's zone to draw its traffic.
        let mut spoof = west.clone();
        spoof.locality = "us-east/us-east-1a".parse().unwrap();
        assert_eq!(hub.session_open(&spoof).unwrap_err().reason, "locality");
        let mut honest = west.clone();
        honest.locality = "eu-west/eu-west-1b".parse().unwrap();
        let _ok = hub.session_open(&honest).unwrap();
    }

    #[test]
    fn a_peer_may_not_announce_an_address_that_is_not_its_own() {
        let (west, mut north) = (hello("west", 1), hello("north", 1));
        north.east_west = Some(([127, 0, 0, 10], 15443).into());
        let hub = hub_with(&[&west, &north], &[], PeeringLimits::default());
        let endpoint: std::net::SocketAddr = ([127, 0, 0, 20], 8080).into();
        let mut local = LocalService {
            export: export("shop/db"),
            endpoints: vec![endpoint],
            endpoint_info: BTreeMap::new(),
            subsets: vec![],
            exported: true,
            allowed_callers: None,
            passthrough: false,
        };
        local.export.export_time_millis = 0;
        hub.set_source("config", vec![local]);
        let _west = hub.session_open(&west).unwrap();

        // North announces west's address, then a local endpoint's.
        north.east_west = west.east_west;
        let err = hub.session_open(&north).unwrap_err();
        assert_eq!(err.reason, "address");
        assert!(
            err.message.contains("peer spiffe://west"),
            "{}",
            err.message
        );
        north.east_west = Some(endpoint);
        let err = hub.session_open(&north).unwrap_err();
        assert!(err.message.contains("shop/db"), "{}", err.message);
        assert_eq!(refused(&hub, "address"), 2);
    }

    #[test]
    fn sessions_per_peer_are_capped() {
        let west = hello("west", 1);
        let limits = PeeringLimits {
            max_sessions_per_peer: 2,
            ..PeeringLimits::default()
        };
        let hub = hub_with(&[&west], &[], limits);
        let (_a, _b) = (
            hub.session_open(&west).unwrap(),
            hub.session_open(&west).unwrap(),
        );
        assert_eq!(hub.session_open(&west).unwrap_err().reason, "sessions");
        drop(_a);
        let _c = hub.session_open(&west).unwrap();
    }

    #[test]
    fn exports_outside_the_imports_or_over_the_cap_are_refused() {
        let west = hello("west", 1);
        let limits = PeeringLimits {
            max_services_per_peer: 2,
            ..PeeringLimits::default()
        };
        let hub = hub_with(&[&west], &["shop/*"], limits);
        let _s = hub.session_open(&west).unwrap();
        let refused_now = hub.apply_snapshot(
            &west,
            1,
            vec![
                export("shop/web"),
                export("kube-system/dns"),
                export("shop/cart"),
            ],
        );
        let reasons: Vec<(&str, &str)> = refused_now
            .iter()
            .map(|r| (r.service.as_str(), r.reason))
            .collect();
        assert_eq!(reasons, [("kube-system/dns", "import")]);
        hub.recompute();
        assert!(
            hub.catalog()
                .load()
                .get(&"kube-system/dns".parse().unwrap())
                .is_none()
        );

        // At the cap: an update of a held service fits, a new one does not.
        let (outcome, refused_now) = hub.apply_delta(
            &west,
            1,
            2,
            vec![export("shop/web"), export("shop/new")],
            vec![],
        );
        assert_eq!(outcome, DeltaOutcome::Applied);
        assert_eq!(refused_now.len(), 1);
        assert_eq!(
            (refused_now[0].service.as_str(), refused_now[0].reason),
            ("shop/new", "services_cap")
        );
        assert_eq!(refused(&hub, "services_cap"), 1);
        assert_eq!(refused(&hub, "import"), 1);
        let peers = hub.debug_peers();
        assert_eq!(peers["peers"][0]["refused_exports_total"], 2);
        assert!(
            peers["peers"][0]["refused_exports"]["shop/new"].is_string(),
            "{peers}"
        );
    }

    #[test]
    fn peer_export_times_are_clamped_to_first_sight_and_now() {
        let west = hello("west", 1);
        let hub = hub_with(&[&west], &[], PeeringLimits::default());
        let _s = hub.session_open(&west).unwrap();
        let before = unix_millis(SystemTime::now());
        let mut old = export("shop/web");
        old.export_time_millis = 1; // "exported in 1970": would win every conflict
        let mut future = export("shop/cart");
        future.export_time_millis = u64::MAX;
        hub.apply_snapshot(&west, 1, vec![old, future]);
        let inner = hub.inner();
        let services = &inner.peers[&west.spiffe_id].catalog.services;
        let after = unix_millis(SystemTime::now());
        for key in ["shop/web", "shop/cart"] {
            let t = services[&key.parse::<ServiceKey>().unwrap()].export_time_millis;
            assert!(
                (before..=after).contains(&t),
                "{key}: {t} not in {before}..={after}"
            );
        }
    }

    #[test]
    fn expired_peers_are_forgotten_after_the_retention_time() {
        let west = hello("west", 1);
        let limits = PeeringLimits {
            peer_retention: Duration::from_secs(60),
            ..PeeringLimits::default()
        };
        let hub = hub_with(&[&west], &[], limits);
        drop(hub.session_open(&west).unwrap());
        let t0 = Instant::now();
        hub.check_leases(t0 + Duration::from_secs(1)); // lapsed
        hub.check_leases(t0 + Duration::from_secs(40)); // expired (grace 30 s)
        assert_eq!(hub.debug_peers()["peers"][0]["state"], "expired");
        let up = |hub: &Hub| {
            hub.metrics()
                .peer_up
                .get_metric_with_label_values(&[west.spiffe_id.as_str(), "west"])
                .is_ok()
        };
        let families = |hub: &Hub| {
            let registry = prometheus::Registry::new();
            registry
                .register(Box::new(hub.metrics().peer_up.clone()))
                .unwrap();
            registry
                .gather()
                .iter()
                .map(|f| f.get_metric().len())
                .sum::<usize>()
        };
        assert!(up(&hub));
        assert_eq!(families(&hub), 1);
        hub.check_leases(t0 + Duration::from_secs(120));
        assert!(hub.debug_peers()["peers"].as_array().unwrap().is_empty());
        assert_eq!(families(&hub), 0, "its metric series are gone");
    }

    #[test]
    fn own_export_times_survive_a_restart_through_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut local = LocalService {
            export: export("shop/web"),
            endpoints: vec![([127, 0, 0, 20], 8080).into()],
            endpoint_info: BTreeMap::new(),
            subsets: vec![],
            exported: true,
            allowed_callers: None,
            passthrough: false,
        };
        local.export.export_time_millis = 0;
        let start = |path: &std::path::Path| {
            let metrics = PeeringMetrics::new(&prometheus::Registry::new()).unwrap();
            let hub = Hub::new(
                me(),
                Duration::from_secs(30),
                Arc::new(ArcSwap::default()),
                None,
                PeeringLimits::default(),
                Some(path.to_owned()),
                metrics,
            );
            hub.set_source("config", vec![local.clone()]);
            hub.exports().borrow().services[&"shop/web".parse::<ServiceKey>().unwrap()]
                .export_time_millis
        };
        let first = start(&path);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            start(&path),
            first,
            "the restarted gateway keeps its export time"
        );
    }

    /// A hub with peers in every state `/debug/peers` shows: live and synced
    /// (with ACKs, NACKs both ways and refused exports), lapsed, expired,
    /// admitted through `federation.accept` (not configured), configured but
    /// never connected; with local exports, a static peer, a conflict and a
    /// headless service for `/debug/catalog`. Times that depend on the clock
    /// are pinned (last sync) or checked and then pinned (last heard).
    fn hub_in_several_states() -> (Arc<Hub>, Vec<SessionGuard>) {
        let mut west = hello("west", 7);
        west.lease = Duration::from_secs(3600);
        let mut north = hello("north", 8);
        north.east_west = None;
        north.lease = Duration::from_secs(20);
        let mut south = hello("south", 9);
        south.east_west = Some(([127, 0, 0, 11], 15443).into());
        let never = hello("east", 1);
        let mut accepted = hello("acc", 3);
        accepted.east_west = Some(([127, 0, 0, 12], 15443).into());
        accepted.lease = Duration::from_secs(3600);
        let hub = hub_with(
            &[&west, &north, &south, &never],
            &["shop/*"],
            PeeringLimits {
                max_services_per_peer: 3,
                ..PeeringLimits::default()
            },
        );
        let mut authority = (*hub.authority()).clone();
        authority.gateways_of.insert(
            accepted.spiffe_id.trust_domain(),
            Grant {
                clusters: [accepted.cluster.clone()].into(),
                localities: vec![],
                imports: ServicePatterns::new(vec!["shop/*".to_owned()]),
                exports: None,
            },
        );
        hub.set_authority(authority);

        let mut web = LocalService {
            export: export("shop/web"),
            endpoints: vec![([127, 0, 0, 20], 8080).into()],
            endpoint_info: BTreeMap::new(),
            subsets: vec![],
            exported: true,
            allowed_callers: None,
            passthrough: false,
        };
        web.export.export_time_millis = 1_600_000_000_000;
        let mut db = LocalService {
            export: export("shop/db"),
            endpoints: vec![([127, 0, 0, 21], 5432).into()],
            endpoint_info: BTreeMap::new(),
            subsets: vec![],
            exported: false,
            allowed_callers: None,
            passthrough: false,
        };
        db.export.export_time_millis = 1_600_000_000_000;
        hub.set_source("config", vec![web, db]);
        hub.set_static_peers(vec![PeerCatalog {
            gateway: RemoteGateway {
                cluster: "legacy".parse().unwrap(),
                spiffe_id: "spiffe://legacy.example/isthmus/gateway/gw"
                    .parse()
                    .unwrap(),
                address: ([127, 0, 0, 30], 15443).into(),
                locality: "eu/eu-1a".parse().unwrap(),
                labels: Default::default(),
                live: true,
                subsets: Vec::new(),
            },
            services: [("shop/legacy".parse().unwrap(), export("shop/legacy"))].into(),
        }]);

        let mut sessions = Vec::new();
        sessions.push(hub.session_open(&west).unwrap());
        let mut tcp = export("shop/web");
        tcp.ports[0].protocol = crate::catalog::Protocol::Tcp;
        let mut headless = export("shop/cache");
        headless.headless = true;
        headless.endpoints = vec![crate::catalog::HeadlessEndpoint {
            cluster: "west".parse().unwrap(),
            hostname: Some("cache-0".parse().unwrap()),
            address: [10, 1, 0, 5].into(),
        }];
        let refused = hub.apply_snapshot(
            &west,
            4,
            vec![
                tcp,
                headless,
                export("kube-system/dns"),
                export("shop/cart"),
            ],
        );
        assert_eq!(refused.len(), 1);
        hub.acked(&west.spiffe_id, 3);
        hub.nacked(&west.spiffe_id, true, "kube-system/dns: not imported");
        hub.nacked(&west.spiffe_id, false, "shop/x: bad port");

        drop(hub.session_open(&north).unwrap());
        hub.apply_snapshot(&north, 1, vec![export("shop/north")]);
        drop(hub.session_open(&south).unwrap());
        hub.apply_snapshot(&south, 2, vec![export("shop/south")]);
        sessions.push(hub.session_open(&accepted).unwrap());

        // North's 20 s lease lapses at 21 s; south's (500 ms) at 21 s too,
        // and expires at 40 s (grace 30 s), when north is still lapsed.
        let t0 = Instant::now();
        for id in [&west, &accepted].map(|p| &p.spiffe_id) {
            hub.inner().peers.get_mut(id).unwrap().last_heard = t0 + Duration::from_secs(40);
        }
        hub.check_leases(t0 + Duration::from_secs(21));
        hub.check_leases(t0 + Duration::from_secs(40));
        for (i, record) in hub.inner().peers.values_mut().enumerate() {
            record.last_heard = Instant::now() - Duration::from_secs(5);
            record.last_sync = record.last_sync.map(|_| {
                SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123 + i as u64)
            });
        }
        hub.recompute();
        (hub, sessions)
    }

    /// `last_heard_ms_ago` of every peer: about 5 s, then pinned to 5000.
    fn pin_last_heard(mut peers: Value) -> Value {
        for peer in peers["peers"].as_array_mut().unwrap() {
            let ago = peer["last_heard_ms_ago"].as_u64().unwrap();
            assert!((5000..6000).contains(&ago), "{ago}");
            peer["last_heard_ms_ago"] = json!(5000);
        }
        peers
    }

    /// `/debug/peers` as operators and the e2e tests read it: field names,
    /// nesting, value formats and field order (compared as text).
    #[test]
    fn debug_peers_keeps_its_shape() {
        let (hub, _sessions) = hub_in_several_states();
        let peers = pin_last_heard(serde_json::to_value(hub.debug_peers()).unwrap());
        let expected = json!(
            {
              "gateway": "spiffe://me.example/isthmus/gateway/gw",
              "cluster": "me",
              "incarnation": 1,
              "export_version": 3,
              "exported": [
                "shop/web"
              ],
              "peers": [
                {
                  "spiffe_id": "spiffe://acc.example/isthmus/gateway/gw",
                  "cluster": "acc",
                  "locality": "r",
                  "east_west": "127.0.0.12:15443",
                  "configured": false,
                  "state": "live",
                  "live": true,
                  "sessions": 1,
                  "incarnation": 3,
                  "lease_ms": 3600000,
                  "last_heard_ms_ago": 5000,
                  "synced": false,
                  "version": 0,
                  "acked_by_peer": 0,
                  "last_sync": null,
                  "services": [],
                  "nacks_sent": 0,
                  "nacks_received": 0,
                  "last_nack": null,
                  "refused_exports_total": 0,
                  "refused_exports": {}
                },
                {
                  "spiffe_id": "spiffe://north.example/isthmus/gateway/gw",
                  "cluster": "north",
                  "locality": "r",
                  "east_west": null,
                  "configured": true,
                  "state": "lapsed",
                  "live": false,
                  "sessions": 0,
                  "incarnation": 8,
                  "lease_ms": 20000,
                  "last_heard_ms_ago": 5000,
                  "synced": true,
                  "version": 1,
                  "acked_by_peer": 0,
                  "last_sync": "2023-11-14T22:13:20.124Z",
                  "services": [
                    "shop/north"
                  ],
                  "nacks_sent": 0,
                  "nacks_received": 0,
                  "last_nack": null,
                  "refused_exports_total": 0,
                  "refused_exports": {}
                },
                {
                  "spiffe_id": "spiffe://south.example/isthmus/gateway/gw",
                  "cluster": "south",
                  "locality": "r",
                  "east_west": "127.0.0.11:15443",
                  "configured": true,
                  "state": "expired",
                  "live": false,
                  "sessions": 0,
                  "incarnation": 9,
                  "lease_ms": 500,
                  "last_heard_ms_ago": 5000,
                  "synced": false,
                  "version": 2,
                  "acked_by_peer": 0,
                  "last_sync": "2023-11-14T22:13:20.125Z",
                  "services": [],
                  "nacks_sent": 0,
                  "nacks_received": 0,
                  "last_nack": null,
                  "refused_exports_total": 0,
                  "refused_exports": {}
                },
                {
                  "spiffe_id": "spiffe://west.example/isthmus/gateway/gw",
                  "cluster": "west",
                  "locality": "r",
                  "east_west": "127.0.0.9:15443",
                  "configured": true,
                  "state": "live",
                  "live": true,
                  "sessions": 1,
                  "incarnation": 7,
                  "lease_ms": 3600000,
                  "last_heard_ms_ago": 5000,
                  "synced": true,
                  "version": 4,
                  "acked_by_peer": 3,
                  "last_sync": "2023-11-14T22:13:20.126Z",
                  "services": [
                    "shop/cache",
                    "shop/cart",
                    "shop/web"
                  ],
                  "nacks_sent": 1,
                  "nacks_received": 1,
                  "last_nack": "received: shop/x: bad port",
                  "refused_exports_total": 1,
                  "refused_exports": {
                    "kube-system/dns": "not among the services this gateway imports from this peer"
                  }
                }
              ],
              "never_connected": [
                "spiffe://east.example/isthmus/gateway/gw"
              ]
            }
        );
        assert_eq!(
            serde_json::to_string_pretty(&peers).unwrap(),
            serde_json::to_string_pretty(&expected).unwrap()
        );
    }

    /// `/debug/catalog` (before the gateway adds clusterset IPs), likewise.
    #[test]
    fn debug_catalog_keeps_its_shape() {
        let (hub, _sessions) = hub_in_several_states();
        let catalog = serde_json::to_value(hub.debug_catalog()).unwrap();
        let expected = json!(
            {
              "cluster": "me",
              "services": [
                {
                  "service": "shop/cache",
                  "ports": [
                    {
                      "port": 80,
                      "protocol": "http"
                    }
                  ],
                  "exported": false,
                  "headless": true,
                  "local_endpoints": [],
                  "remote": [
                    {
                      "cluster": "west",
                      "gateway": "spiffe://west.example/isthmus/gateway/gw",
                      "address": "127.0.0.9:15443",
                      "locality": "r"
                    }
                  ],
                  "headless_endpoints": [
                    {
                      "cluster": "west",
                      "hostname": "cache-0",
                      "address": "10.1.0.5"
                    }
                  ]
                },
                {
                  "service": "shop/cart",
                  "ports": [
                    {
                      "port": 80,
                      "protocol": "http"
                    }
                  ],
                  "exported": false,
                  "headless": false,
                  "local_endpoints": [],
                  "remote": [
                    {
                      "cluster": "west",
                      "gateway": "spiffe://west.example/isthmus/gateway/gw",
                      "address": "127.0.0.9:15443",
                      "locality": "r"
                    }
                  ],
                  "headless_endpoints": []
                },
                {
                  "service": "shop/db",
                  "ports": [
                    {
                      "port": 80,
                      "protocol": "http"
                    }
                  ],
                  "exported": false,
                  "headless": false,
                  "local_endpoints": [
                    "127.0.0.21:5432"
                  ],
                  "remote": [],
                  "headless_endpoints": []
                },
                {
                  "service": "shop/legacy",
                  "ports": [
                    {
                      "port": 80,
                      "protocol": "http"
                    }
                  ],
                  "exported": false,
                  "headless": false,
                  "local_endpoints": [],
                  "remote": [
                    {
                      "cluster": "legacy",
                      "gateway": "spiffe://legacy.example/isthmus/gateway/gw",
                      "address": "127.0.0.30:15443",
                      "locality": "eu/eu-1a"
                    }
                  ],
                  "headless_endpoints": []
                },
                {
                  "service": "shop/web",
                  "ports": [
                    {
                      "port": 80,
                      "protocol": "http"
                    }
                  ],
                  "exported": true,
                  "headless": false,
                  "local_endpoints": [
                    "127.0.0.20:8080"
                  ],
                  "remote": [
                    {
                      "cluster": "west",
                      "gateway": "spiffe://west.example/isthmus/gateway/gw",
                      "address": "127.0.0.9:15443",
                      "locality": "r"
                    }
                  ],
                  "headless_endpoints": []
                }
              ],
              "conflicts": [
                {
                  "service": {
                    "namespace": "shop",
                    "name": "web"
                  },
                  "field": "port 80 protocol",
                  "chosen": "http",
                  "chosen_from": "me",
                  "rejected": [
                    [
                      "west",
                      "tcp"
                    ]
                  ]
                }
              ]
            }
        );
        assert_eq!(
            serde_json::to_string_pretty(&catalog).unwrap(),
            serde_json::to_string_pretty(&expected).unwrap()
        );
    }
}
