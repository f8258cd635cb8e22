//! DNS for federated services: the `clusterset.local` zone of the MCS DNS
//! specification 1.0.0, clusterset IPs, and forwarding of everything else.
//!
//! - [`ips`] gives each service a clusterset IP from a configured range,
//!   stable across restarts.
//! - [`zone`] builds the zone from a catalog snapshot and those addresses.
//! - [`server`] answers queries over UDP and TCP.
//! - [`guard`] decides who is answered and how much: allowed sources,
//!   response-rate limiting, zone transfers, ANY.
//! - [`ClusterSet`] ties them to the catalog: on every catalog change it
//!   brings the allocations up to date and publishes a new zone, and it
//!   follows the health of this cluster's headless endpoints
//!   ([`EndpointHealth`]) so that only ready ones are published.

pub mod guard;
pub mod ips;
pub mod metrics;
pub mod server;
pub mod zone;

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::watch;

pub use guard::{DnsPolicy, RateLimit, SourceAcl, SourceNet};
pub use ips::{Allocations, Allocator, ClusterSetIp, IpRange, IpRangeError};
pub use metrics::{DnsMetrics, QueryType, Rcode};
pub use server::{
    AnswerSource, DnsServer, ForwardConfig, PolicyRefusal, RateLimitAction, TcpRefusal, Transport,
};
pub use zone::{ClusterSetZone, Unready, ZoneSettings};

use crate::catalog::Catalog;
use crate::{ClusterName, ServiceKey};

/// How often the health of headless endpoints is looked at: a health check
/// or an ejection shows in DNS within this long (plus the records' TTL).
pub const READINESS_POLL: Duration = Duration::from_secs(1);

/// What this cluster's gateway knows of its own endpoints: whether one takes
/// traffic now (its active health checks pass and outlier detection does not
/// hold it out).
pub trait EndpointHealth: Send + Sync {
    /// Whether `endpoint` of `service` is up.
    fn is_up(&self, service: &ServiceKey, endpoint: SocketAddr) -> bool;
}

/// Keeps the clusterset IPs and the zone in step with the catalog.
pub struct ClusterSet {
    allocator: Mutex<Allocator>,
    ranges: Vec<IpRange>,
    ttl: Duration,
    serial: AtomicU32,
    zone: Arc<ArcSwap<ClusterSetZone>>,
    allocations: watch::Sender<Arc<Allocations>>,
    metrics: DnsMetrics,
    /// This cluster, and the health of its endpoints; `None`: every endpoint
    /// is published.
    health: Option<(ClusterName, Arc<dyn EndpointHealth>)>,
    /// The endpoints held out of the zone published last.
    unready: Mutex<Unready>,
}

impl ClusterSet {
    /// Publishes zones with records of `ttl`, allocating from `allocator`.
    pub fn new(
        allocator: Allocator,
        ranges: Vec<IpRange>,
        ttl: Duration,
        metrics: DnsMetrics,
    ) -> Self {
        let (allocations, _) = watch::channel(Arc::default());
        // Serials start at the clock so that a restarted server's are newer.
        let serial = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u32::try_from(d.as_secs()).unwrap_or(1));
        let settings = ZoneSettings {
            ttl: ttl_secs(ttl),
            serial,
        };
        let zone = ClusterSetZone::build(
            &Catalog::default(),
            &Allocations::default(),
            &ranges,
            settings,
            &Unready::default(),
        );
        Self {
            allocator: Mutex::new(allocator),
            ranges,
            ttl,
            serial: AtomicU32::new(serial),
            zone: Arc::new(ArcSwap::from_pointee(zone)),
            allocations,
            metrics,
            health: None,
            unready: Mutex::default(),
        }
    }

    /// Publishes only the headless endpoints of `cluster` (this one) that
    /// `health` holds up; other clusters' endpoints are published as their
    /// cluster exported them.
    #[must_use]
    pub fn with_endpoint_health(
        mut self,
        cluster: ClusterName,
        health: Arc<dyn EndpointHealth>,
    ) -> Self {
        self.health = Some((cluster, health));
        self
    }

    /// The headless endpoints of this cluster in `catalog` that are not
    /// ready. An address is ready while any of its ports is up: DNS names
    /// addresses, and a port that fails takes only its own traffic away.
    fn unready(&self, catalog: &Catalog) -> Unready {
        let Some((cluster, health)) = &self.health else {
            return Unready::default();
        };
        let mut unready = Unready::new(cluster.clone());
        for entry in catalog.iter().filter(|e| e.headless) {
            let mut up: BTreeMap<IpAddr, bool> = BTreeMap::new();
            for endpoint in &entry.endpoints {
                *up.entry(endpoint.ip()).or_default() |= health.is_up(&entry.key, *endpoint);
            }
            for (address, _) in up.into_iter().filter(|(_, up)| !up) {
                unready.insert(entry.key.clone(), address);
            }
        }
        unready
    }

    /// The zone the DNS server answers from.
    pub fn zone(&self) -> &Arc<ArcSwap<ClusterSetZone>> {
        &self.zone
    }

    /// The clusterset IPs of the services in the catalog, and their changes.
    pub fn allocations(&self) -> watch::Receiver<Arc<Allocations>> {
        self.allocations.subscribe()
    }

    /// The metrics.
    pub fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }

    /// Brings the allocations and the zone up to date with `catalog`.
    pub fn update(&self, catalog: &Catalog) {
        // Headless services have no clusterset IP; services nobody exports
        // are not in the zone.
        let keys = catalog
            .iter()
            .filter(|e| !e.headless && (e.exported || !e.remote.is_empty()))
            .map(|e| &e.key);
        let (allocations, exhausted) = {
            let mut allocator = self.allocator.lock();
            let (allocations, saved) = allocator.sync(keys);
            if let Err(e) = saved {
                tracing::error!(error = %e, "cannot save the clusterset IPs; they may change on restart");
            }
            (allocations, allocator.exhausted().to_vec())
        };
        if !exhausted.is_empty() {
            tracing::error!(services = exhausted.len(), first = %exhausted[0],
                "the clusterset IP range is full; these services have no clusterset IP");
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let unready = self.unready(catalog);
        let zone = ClusterSetZone::build(
            catalog,
            &allocations,
            &self.ranges,
            ZoneSettings {
                ttl: ttl_secs(self.ttl),
                serial,
            },
            &unready,
        );
        *self.unready.lock() = unready;
        self.metrics
            .zone_names
            .set(i64::try_from(zone.len()).unwrap_or(i64::MAX));
        self.metrics
            .clusterset_ips
            .set(i64::try_from(allocations.len()).unwrap_or(i64::MAX));
        self.metrics
            .clusterset_exhausted
            .set(i64::try_from(exhausted.len()).unwrap_or(i64::MAX));
        self.zone.store(Arc::new(zone));
        self.allocations.send_if_modified(|current| {
            if **current == allocations {
                return false;
            }
            *current = Arc::new(allocations);
            true
        });
    }

    /// Whether the readiness of this cluster's headless endpoints in
    /// `catalog` differs from the zone published last.
    fn readiness_changed(&self, catalog: &Catalog) -> bool {
        self.health.is_some() && self.unready(catalog) != *self.unready.lock()
    }

    /// Follows the catalog until `stop`: `changes` ticks on every new
    /// snapshot in `catalog`. With endpoint health, it is looked at every
    /// [`READINESS_POLL`] too (ejections end with no event to wait for).
    pub async fn run(
        self: Arc<Self>,
        catalog: Arc<ArcSwap<Catalog>>,
        mut changes: watch::Receiver<u64>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut poll = tokio::time::interval(READINESS_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.update(&catalog.load());
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.update(&catalog.load());
                }
                _ = poll.tick(), if self.health.is_some() => {
                    let snapshot = catalog.load();
                    if self.readiness_changed(&snapshot) {
                        self.update(&snapshot);
                    }
                }
                _ = stop.changed() => return,
            }
        }
    }
}

fn ttl_secs(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)
}
