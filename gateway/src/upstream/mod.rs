//! Backends and their protection: which targets of a service may take
//! traffic now, and what each request or connection did to them.
//!
//! A backend is one address serving one service: an endpoint in this cluster
//! or a peer gateway. Each has
//! - circuit-breaker counters (requests in flight, requests waiting for a
//!   connection, L4 connections) held by RAII leases;
//! - passive outlier state ([`outlier`]) fed by every outcome;
//! - active health ([`probe`]), shared by every service at that address;
//! - for a peer gateway, its peering lease (`RemoteGateway::live` in the
//!   catalog): a closed session or a lapsed lease takes it out at once.
//!
//! Planning an attempt ([`crate::proxy::balance`]) stays a pure function; this
//! module answers "how does this address stand" for it (including slow start
//! after a recovery), holds the routes, and cuts the mesh connections of a
//! peer gateway the moment it is declared dead, so requests waiting on it are
//! retried elsewhere instead of waiting for a timeout.

mod budget;
pub mod explain;
pub mod leases;
pub mod outlier;
pub mod probe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use isthmus_federation::ServiceKey;
use isthmus_federation::catalog::ServiceEntry;
use prometheus::{IntCounterVec, IntGaugeVec, Registry};
use serde::Serialize;
use tokio::sync::broadcast;
use tracing::{info, warn};

pub use self::budget::RetryBudget;
use self::outlier::{Outcome, Outlier, may_eject_another};
use crate::config::model::RouteConfig;
use crate::config::upstream::UpstreamConfig;
use crate::metrics;
use crate::proxy::balance::{self, Here, Plan, Rated, Scope};
use crate::proxy::routing::Availability;

/// How long an expired peer gateway is remembered, so that its
/// return counts as a recovery (slow start, ejections lifted).
const FORGET_DEAD_PEERS: Duration = Duration::from_secs(3600);
/// Slow start begins at this share of a backend's weight.
const SLOW_START_FLOOR: f64 = 0.1;

/// What a backend is used for, which decides the limit that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// HTTP requests (`max_requests`, `max_pending_requests`).
    Http,
    /// L4 connections (`max_connections`).
    Tcp,
}

/// Active health of one address, shared by every service served there.
#[derive(Debug)]
pub struct Health {
    healthy: AtomicBool,
    /// Probes in a row with the same result as the last.
    streak: AtomicU32,
    /// When it last came back (health checks passing again, a peer's lease
    /// renewed after it lapsed), in nanoseconds since the `Upstreams` epoch;
    /// 0: never, which needs no slow start (new backends get traffic at once).
    recovered_at: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        // Healthy until probes say otherwise: a new backend gets traffic at once.
        Self {
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            recovered_at: AtomicU64::new(0),
        }
    }
}

impl Health {
    /// Whether active checks consider the address healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// Notes that the address of `health` came back at `now`.
fn mark_recovered(health: &Health, epoch: Instant, now: Instant) {
    let nanos = u64::try_from(now.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
    // 0 means "never": a recovery in the first nanosecond counts as 1.
    health.recovered_at.store(nanos.max(1), Ordering::Relaxed);
}

/// The share of its weight a backend carries at `now`: from
/// [`SLOW_START_FLOOR`] right after it came back up to 1 over `window`.
fn ramp(health: &Health, epoch: Instant, now: Instant, window: Duration) -> f64 {
    let at = health.recovered_at.load(Ordering::Relaxed);
    if at == 0 || window.is_zero() {
        return 1.0;
    }
    let since = now
        .saturating_duration_since(epoch + Duration::from_nanos(at))
        .as_secs_f64();
    (since / window.as_secs_f64()).clamp(SLOW_START_FLOOR, 1.0)
}

/// One service's backend at one address.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    health: Arc<Health>,
    requests: AtomicUsize,
    pending: AtomicUsize,
    connections: AtomicUsize,
    outlier: Mutex<Outlier>,
    /// Mirrors `outlier` being ejected, so picking takes no lock.
    ejected: AtomicBool,
}

impl Backend {
    fn new(addr: SocketAddr, health: Arc<Health>) -> Self {
        Self {
            addr,
            health,
            requests: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            outlier: Mutex::new(Outlier::default()),
            ejected: AtomicBool::new(false),
        }
    }

    /// Whether outlier detection holds it out now. The end of an ejection
    /// is no recovery for slow start: the backend returns on probation, at
    /// full weight, and is ejected for twice as long if it fails again.
    fn is_ejected(&self, now: Instant) -> bool {
        if !self.ejected.load(Ordering::Relaxed) {
            return false;
        }
        let ejected = self.outlier.lock().expect("outlier lock").is_ejected(now);
        if !ejected {
            self.ejected.store(false, Ordering::Relaxed);
        }
        ejected
    }

    fn availability(&self, now: Instant, limits: &UpstreamConfig, usage: Use) -> Availability {
        if !self.health.is_healthy() || self.is_ejected(now) {
            return Availability::Down;
        }
        let cb = &limits.circuit_breaker;
        let full = match usage {
            Use::Http => {
                self.requests.load(Ordering::Relaxed) >= cb.max_requests
                    || self.pending.load(Ordering::Relaxed) >= cb.max_pending_requests
            }
            Use::Tcp => self.connections.load(Ordering::Relaxed) >= cb.max_connections,
        };
        if full {
            Availability::Full
        } else {
            Availability::Up
        }
    }
}

/// The backends of one service, and its retry budget.
#[derive(Debug)]
pub struct ServiceBackends {
    key: ServiceKey,
    backends: RwLock<HashMap<SocketAddr, Arc<Backend>>>,
    /// Retries of this service's requests.
    pub budget: RetryBudget,
}

/// Holds a request's place in a backend's counters until dropped.
#[derive(Debug)]
pub struct RequestLease {
    backend: Arc<Backend>,
    pending: bool,
}

impl RequestLease {
    /// The backend the request went to.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The request got its connection: it no longer counts as pending.
    pub fn connected(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.backend.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for RequestLease {
    fn drop(&mut self) {
        self.connected();
        self.backend.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds an L4 connection's place in a backend's counter until dropped.
#[derive(Debug)]
pub struct ConnectionLease(Arc<Backend>);

impl Drop for ConnectionLease {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Metrics of backend protection.
#[derive(Clone)]
struct UpstreamMetrics {
    ejections: IntCounterVec,
    overloaded: IntCounterVec,
    retries: IntCounterVec,
    healthy: IntGaugeVec,
    health_checks: IntCounterVec,
    failovers: IntCounterVec,
    panics: IntCounterVec,
    cuts: IntCounterVec,
}

impl UpstreamMetrics {
    fn new(registry: &Registry) -> Self {
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(
                prometheus::Opts::new(name, help).namespace(metrics::NAMESPACE),
                labels,
            )
            .expect("static metric definition is valid");
            metrics::register(registry, g.clone());
            g
        };
        Self {
            ejections: metrics::counter_vec(
                registry,
                "upstream_ejections_total",
                "Backends ejected by outlier detection, by service, namespace and backend address.",
                &["service", "namespace", "backend"],
            ),
            overloaded: metrics::counter_vec(
                registry,
                "upstream_overloaded_total",
                "Requests and connections refused because every backend of the service was at a circuit-breaker limit.",
                &["service", "namespace"],
            ),
            retries: metrics::counter_vec(
                registry,
                "upstream_retries_total",
                "Retries by service, namespace and reason (connect, after_send, dead_backend: after the request went out to a backend declared dead meanwhile, not budgeted; budget_exhausted: a retry the budget refused).",
                &["service", "namespace", "reason"],
            ),
            healthy: gauge_vec(
                "upstream_healthy",
                "1 while active health checks pass for a backend address, 0 while they fail.",
                &["backend"],
            ),
            health_checks: metrics::counter_vec(
                registry,
                "upstream_health_checks_total",
                "Active health checks by result (ok, failed).",
                &["result"],
            ),
            failovers: metrics::counter_vec(
                registry,
                "upstream_failovers_total",
                "Attempts retried in another cluster than the previous attempt's, by service, namespace and both clusters.",
                &["service", "namespace", "from_cluster", "to_cluster"],
            ),
            panics: metrics::counter_vec(
                registry,
                "upstream_panic_total",
                "Attempts planned in panic mode (too few backends available: health ignored), by service and namespace.",
                &["service", "namespace"],
            ),
            cuts: metrics::counter_vec(
                registry,
                "upstream_peer_cuts_total",
                "Times a peer gateway's mesh connections were cut because it was declared dead, by reason (lease_lost: its peering session closed or its lease lapsed; health_check).",
                &["peer", "reason"],
            ),
        }
    }
}

/// Every backend the data plane has used, the policy that protects them and
/// the routes that spread requests over them.
pub struct Upstreams {
    policy: ArcSwap<UpstreamConfig>,
    routes: ArcSwap<HashMap<ServiceKey, Arc<RouteConfig>>>,
    here: Here,
    epoch: Instant,
    services: RwLock<HashMap<ServiceKey, Arc<ServiceBackends>>>,
    health: RwLock<HashMap<SocketAddr, Arc<Health>>>,
    /// Peering peers' gateway addresses, whether their lease was live when
    /// last looked at, and since when (an expired peer is remembered as not
    /// live for a while, so its return is a recovery too).
    liveness: Mutex<HashMap<SocketAddr, (bool, Instant)>>,
    /// Addresses whose mesh connections must be cut now.
    cuts: broadcast::Sender<SocketAddr>,
    metrics: UpstreamMetrics,
}

impl Upstreams {
    /// Backends of a gateway at `here` protected by `policy`, with metrics in
    /// `registry`.
    pub fn new(policy: UpstreamConfig, here: Here, registry: &Registry) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            routes: ArcSwap::default(),
            here,
            epoch: Instant::now(),
            services: RwLock::default(),
            health: RwLock::default(),
            liveness: Mutex::default(),
            cuts: broadcast::channel(64).0,
            metrics: UpstreamMetrics::new(registry),
        }
    }

    /// Applies (reloaded) routes.
    pub fn set_routes(&self, routes: &[RouteConfig]) {
        self.routes.store(Arc::new(
            routes
                .iter()
                .map(|r| (r.service.clone(), Arc::new(r.clone())))
                .collect(),
        ));
    }

    /// The routes of `key`, if it has any.
    pub fn routes(&self, key: &ServiceKey) -> Option<Arc<RouteConfig>> {
        self.routes.load().get(key).cloned()
    }

    /// Whether any service has routes (most gateways have none: the request
    /// path then skips the lookup).
    pub fn has_routes(&self) -> bool {
        !self.routes.load().is_empty()
    }

    /// Where addresses whose mesh connections must be cut are announced:
    /// the relay subscribes once per connection.
    pub fn cut_signal(&self) -> broadcast::Sender<SocketAddr> {
        self.cuts.clone()
    }

    fn cut(&self, addr: SocketAddr, reason: &str) {
        self.metrics
            .cuts
            .with_label_values(&[&addr.to_string(), reason])
            .inc();
        // No receiver (no relay) is fine: there is nothing to cut.
        let _ = self.cuts.send(addr);
    }

    /// Plans the next attempt of a request to `entry` in `scope`.
    #[allow(clippy::too_many_arguments)]
    pub fn plan(
        &self,
        backends: &ServiceBackends,
        entry: &ServiceEntry,
        scope: Scope<'_>,
        local_only: bool,
        tried: &[SocketAddr],
        usage: Use,
        policy: &UpstreamConfig,
    ) -> Plan {
        let plan = self.plan_uncounted(backends, entry, scope, local_only, tried, usage, policy);
        if plan.panic {
            self.metrics
                .panics
                .with_label_values(&[entry.key.name.as_str(), entry.key.namespace.as_str()])
                .inc();
        }
        plan
    }

    /// [`Self::plan`] without counting it (for `/debug/explain`).
    #[allow(clippy::too_many_arguments)]
    fn plan_uncounted(
        &self,
        backends: &ServiceBackends,
        entry: &ServiceEntry,
        scope: Scope<'_>,
        local_only: bool,
        tried: &[SocketAddr],
        usage: Use,
        policy: &UpstreamConfig,
    ) -> Plan {
        let now = Instant::now();
        balance::plan(
            entry,
            &self.here,
            &policy.locality,
            scope,
            local_only,
            tried,
            |a| self.rate(backends, a, usage, now, policy),
        )
    }

    /// How `service`'s backend at `addr` stands for `usage` now, slow start
    /// included.
    pub fn rate(
        &self,
        service: &ServiceBackends,
        addr: SocketAddr,
        usage: Use,
        now: Instant,
        policy: &UpstreamConfig,
    ) -> Rated {
        let window = policy.locality.slow_start_window;
        let known = service
            .backends
            .read()
            .expect("backends lock")
            .get(&addr)
            .map(|b| Rated {
                availability: b.availability(now, policy, usage),
                ramp: ramp(&b.health, self.epoch, now, window),
            });
        known.unwrap_or_else(|| {
            // Never used by this service: only active health (and slow start
            // after it recovered) can speak against it.
            let health = self.health.read().expect("health lock");
            let Some(h) = health.get(&addr) else {
                return Rated::UP;
            };
            Rated {
                availability: if h.is_healthy() {
                    Availability::Up
                } else {
                    Availability::Down
                },
                ramp: ramp(h, self.epoch, now, window),
            }
        })
    }

    /// Counts an attempt retried in another cluster.
    pub fn failed_over(&self, key: &ServiceKey, from: &str, to: &str) {
        self.metrics
            .failovers
            .with_label_values(&[key.name.as_str(), key.namespace.as_str(), from, to])
            .inc();
    }

    /// Follows peer gateways' leases (`gateways`: east-west address and
    /// whether live, from the hub): a gateway whose session closed or lease
    /// lapsed has its mesh connections cut (requests waiting on it are
    /// retried elsewhere); one that is back starts slowly and is no longer
    /// ejected.
    pub fn observe_leases(&self, gateways: &[(SocketAddr, bool)]) {
        let mut seen: HashMap<SocketAddr, bool> = HashMap::new();
        for (addr, live) in gateways {
            *seen.entry(*addr).or_insert(*live) &= *live;
        }
        let now = Instant::now();
        let mut known = self.liveness.lock().expect("liveness lock");
        for (addr, live) in &seen {
            match known.get(addr) {
                Some((true, _)) if !live => {
                    warn!(peer = %addr, "peer gateway lost its lease; cutting its connections, traffic fails over");
                    self.cut(*addr, "lease_lost");
                }
                Some((false, _)) if *live => {
                    info!(peer = %addr, "peer gateway is back; it gets traffic again, slowly");
                    self.recovered(*addr, now);
                }
                _ => {}
            }
        }
        // Gone (its services expired): no longer live.
        for (addr, (live, since)) in known.iter_mut() {
            if *live && !seen.contains_key(addr) {
                warn!(peer = %addr, "peer gateway expired; cutting its connections");
                self.cut(*addr, "lease_lost");
                *live = false;
                *since = now;
            }
        }
        for (addr, live) in seen {
            let entry = known.entry(addr).or_insert((live, now));
            if entry.0 != live {
                *entry = (live, now);
            }
        }
        known.retain(|_, (live, since)| *live || now.duration_since(*since) < FORGET_DEAD_PEERS);
    }

    /// Whether `addr` is declared dead: a peering peer whose lease is lost,
    /// or an address failing active health checks. (An ejection is not: a
    /// backend answering 5xx may merely be overloaded.)
    pub fn declared_dead(&self, addr: SocketAddr) -> bool {
        let lease_lost = self
            .liveness
            .lock()
            .expect("liveness lock")
            .get(&addr)
            .is_some_and(|(live, _)| !live);
        lease_lost
            || self
                .health
                .read()
                .expect("health lock")
                .get(&addr)
                .is_some_and(|h| !h.is_healthy())
    }

    /// `addr` came back: slow start from now, and no ejection holds it out.
    fn recovered(&self, addr: SocketAddr, now: Instant) {
        mark_recovered(&self.health_of(addr), self.epoch, now);
        for service in self.services.read().expect("services lock").values() {
            if let Some(b) = service.backends.read().expect("backends lock").get(&addr) {
                b.outlier.lock().expect("outlier lock").forgive();
                b.ejected.store(false, Ordering::Relaxed);
            }
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<UpstreamConfig> {
        self.policy.load_full()
    }

    /// Applies a reloaded policy; counters and outlier state are kept.
    pub fn set_policy(&self, policy: UpstreamConfig) {
        self.policy.store(Arc::new(policy));
    }

    /// The backends of `key`, created on first use.
    pub fn service(&self, key: &ServiceKey) -> Arc<ServiceBackends> {
        if let Some(s) = self.services.read().expect("services lock").get(key) {
            return s.clone();
        }
        self.services
            .write()
            .expect("services lock")
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(ServiceBackends {
                    key: key.clone(),
                    backends: RwLock::default(),
                    budget: RetryBudget::new(),
                })
            })
            .clone()
    }

    fn health_of(&self, addr: SocketAddr) -> Arc<Health> {
        if let Some(h) = self.health.read().expect("health lock").get(&addr) {
            return h.clone();
        }
        self.health
            .write()
            .expect("health lock")
            .entry(addr)
            .or_default()
            .clone()
    }

    /// `service`'s backend at `addr`, created on first use.
    pub fn backend(&self, service: &ServiceBackends, addr: SocketAddr) -> Arc<Backend> {
        if let Some(b) = service.backends.read().expect("backends lock").get(&addr) {
            return b.clone();
        }
        let health = self.health_of(addr);
        service
            .backends
            .write()
            .expect("backends lock")
            .entry(addr)
            .or_insert_with(|| Arc::new(Backend::new(addr, health)))
            .clone()
    }

    /// Counts a request to `backend`, pending until [`RequestLease::connected`].
    pub fn lease_request(&self, backend: Arc<Backend>) -> RequestLease {
        backend.requests.fetch_add(1, Ordering::Relaxed);
        backend.pending.fetch_add(1, Ordering::Relaxed);
        RequestLease {
            backend,
            pending: true,
        }
    }

    /// Counts an L4 connection to `backend`.
    pub fn lease_connection(&self, backend: Arc<Backend>) -> ConnectionLease {
        backend.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionLease(backend)
    }

    /// Records what a request or connection did to `backend` of `service`,
    /// which has `targets` backends in all now.
    pub fn record(
        &self,
        service: &ServiceBackends,
        backend: &Backend,
        outcome: Outcome,
        targets: usize,
    ) {
        let policy = self.policy.load();
        let now = Instant::now();
        let may_eject = || {
            let ejected = service
                .backends
                .read()
                .expect("backends lock")
                .values()
                .filter(|b| b.addr != backend.addr && b.is_ejected(now))
                .count();
            may_eject_another(
                ejected,
                targets.max(1),
                policy.outlier_detection.max_ejection_percent,
            )
        };
        let ejected_for = backend.outlier.lock().expect("outlier lock").record(
            outcome,
            now,
            &policy.outlier_detection,
            may_eject,
        );
        if let Some(length) = ejected_for {
            backend.ejected.store(true, Ordering::Relaxed);
            self.metrics
                .ejections
                .with_label_values(&[
                    service.key.name.as_str(),
                    service.key.namespace.as_str(),
                    &backend.addr.to_string(),
                ])
                .inc();
            warn!(
                service = %service.key,
                backend = %backend.addr,
                seconds = length.as_secs_f64(),
                "backend ejected after consecutive failures"
            );
        }
    }

    /// Counts a request or connection refused for want of a backend below its limits.
    pub fn overloaded(&self, key: &ServiceKey) {
        self.metrics
            .overloaded
            .with_label_values(&[key.name.as_str(), key.namespace.as_str()])
            .inc();
    }

    /// Counts a retry (or one the budget refused) by reason.
    pub fn retried(&self, key: &ServiceKey, reason: &str) {
        self.metrics
            .retries
            .with_label_values(&[key.name.as_str(), key.namespace.as_str(), reason])
            .inc();
    }

    /// Records an active health check of `addr`; returns true when its health changed.
    fn health_checked(&self, addr: SocketAddr, ok: bool, unhealthy: u32, healthy: u32) -> bool {
        let health = self.health_of(addr);
        self.metrics
            .health_checks
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
        let was = health.is_healthy();
        let streak = if ok == was {
            // Same as the state: any streak towards the other state is broken.
            health.streak.store(0, Ordering::Relaxed);
            0
        } else {
            health.streak.fetch_add(1, Ordering::Relaxed) + 1
        };
        let needed = if was { unhealthy } else { healthy };
        let flipped = ok != was && streak >= needed;
        if flipped {
            health.healthy.store(ok, Ordering::Relaxed);
            health.streak.store(0, Ordering::Relaxed);
            if ok {
                mark_recovered(&health, self.epoch, Instant::now());
            } else if self
                .liveness
                .lock()
                .expect("liveness lock")
                .contains_key(&addr)
            {
                // A peering peer's gateway: requests waiting on it go elsewhere.
                self.cut(addr, "health_check");
            }
        }
        self.metrics
            .healthy
            .with_label_values(&[&addr.to_string()])
            .set(i64::from(health.is_healthy()));
        flipped
    }

    /// Marks every address healthy: active checks are off.
    fn forget_health(&self) {
        for health in self.health.read().expect("health lock").values() {
            health.healthy.store(true, Ordering::Relaxed);
            health.streak.store(0, Ordering::Relaxed);
        }
    }

    /// Forgets addresses and services no longer in use, keeping `live`.
    fn retain(&self, live_services: &[ServiceKey], live_addrs: &[SocketAddr]) {
        self.services
            .write()
            .expect("services lock")
            .retain(|k, _| live_services.contains(k));
        self.health
            .write()
            .expect("health lock")
            .retain(|a, _| live_addrs.contains(a));
        for service in self.services.read().expect("services lock").values() {
            service
                .backends
                .write()
                .expect("backends lock")
                .retain(|a, _| live_addrs.contains(a));
        }
    }

    /// A snapshot for `/debug/upstreams`.
    pub fn snapshot(&self) -> UpstreamsSnapshot {
        let now = Instant::now();
        let mut services: Vec<ServiceSnapshot> = self
            .services
            .read()
            .expect("services lock")
            .values()
            .map(|s| {
                let mut backends: Vec<BackendSnapshot> = s
                    .backends
                    .read()
                    .expect("backends lock")
                    .values()
                    .map(|b| {
                        let outlier = b.outlier.lock().expect("outlier lock");
                        BackendSnapshot {
                            address: b.addr,
                            healthy: b.health.is_healthy(),
                            ejected: outlier.is_ejected(now),
                            ejected_for_seconds: outlier
                                .ejected_until()
                                .filter(|u| *u > now)
                                .map(|u| (u - now).as_secs_f64()),
                            requests: b.requests.load(Ordering::Relaxed),
                            pending_requests: b.pending.load(Ordering::Relaxed),
                            connections: b.connections.load(Ordering::Relaxed),
                        }
                    })
                    .collect();
                backends.sort_by_key(|b| b.address);
                ServiceSnapshot {
                    service: s.key.to_string(),
                    backends,
                }
            })
            .collect();
        services.sort_by(|a, b| a.service.cmp(&b.service));
        UpstreamsSnapshot { services }
    }
}

/// `/debug/upstreams`
#[derive(Debug, Serialize)]
pub struct UpstreamsSnapshot {
    /// Services that have sent traffic, by name.
    pub services: Vec<ServiceSnapshot>,
}

/// One service in [`UpstreamsSnapshot`].
#[derive(Debug, Serialize)]
pub struct ServiceSnapshot {
    /// `namespace/name`.
    pub service: String,
    /// Its backends, by address.
    pub backends: Vec<BackendSnapshot>,
}

/// One backend in [`UpstreamsSnapshot`].
#[derive(Debug, Serialize)]
pub struct BackendSnapshot {
    /// Address.
    pub address: SocketAddr,
    /// Active health.
    pub healthy: bool,
    /// Ejected by outlier detection.
    pub ejected: bool,
    /// Time left of the ejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_seconds: Option<f64>,
    /// HTTP requests in flight.
    pub requests: usize,
    /// HTTP requests waiting for a connection.
    pub pending_requests: usize,
    /// L4 connections open.
    pub connections: usize,
}

#[cfg(test)]
mod tests {
    use isthmus_federation::catalog::Catalog;

    use super::*;

    fn upstreams() -> Upstreams {
        let here = Here {
            cluster: "home".parse().unwrap(),
            locality: "r".parse().unwrap(),
            labels: Default::default(),
        };
        Upstreams::new(UpstreamConfig::default(), here, &Registry::new())
    }

    fn ramp_of(u: &Upstreams, addr: SocketAddr) -> f64 {
        let service = u.service(&"shop/web".parse().unwrap());
        let policy = u.policy();
        u.rate(&service, addr, Use::Http, Instant::now(), &policy)
            .ramp
    }

    #[test]
    fn a_peer_losing_its_lease_is_cut_and_its_return_starts_slowly() {
        let u = upstreams();
        let mut cuts = u.cut_signal().subscribe();
        let a: SocketAddr = "127.0.0.1:15443".parse().unwrap();

        // First seen live: no cut, and no slow start (a new peer gets traffic at once).
        u.observe_leases(&[(a, true)]);
        assert!(cuts.try_recv().is_err());
        assert_eq!(ramp_of(&u, a), 1.0);
        assert!(!u.declared_dead(a));

        // Its lease is lost: its connections are cut, it is declared dead.
        u.observe_leases(&[(a, false)]);
        assert_eq!(cuts.try_recv(), Ok(a));
        assert!(u.declared_dead(a));

        // Back: alive, at the floor of slow start.
        u.observe_leases(&[(a, true)]);
        assert!(!u.declared_dead(a));
        assert!((ramp_of(&u, a) - SLOW_START_FLOOR).abs() < 0.01);

        // Expired (gone from the hub while live): cut, and its return is a
        // recovery again, not a new peer.
        u.observe_leases(&[]);
        assert_eq!(cuts.try_recv(), Ok(a));
        assert!(u.declared_dead(a));
        u.observe_leases(&[(a, true)]);
        assert!(cuts.try_recv().is_err());
        assert!(ramp_of(&u, a) < 0.2);
    }

    #[test]
    fn explain_says_why_a_dead_peer_gets_nothing_and_who_takes_over() {
        use isthmus_federation::catalog::{Protocol, RemoteGateway, ServicePort};
        let u = upstreams();
        let gateway = |cluster: &str, locality: &str, n: u8, live: bool| RemoteGateway {
            cluster: cluster.parse().unwrap(),
            spiffe_id: format!("spiffe://{cluster}.example/isthmus/gateway/gw")
                .parse()
                .unwrap(),
            address: SocketAddr::from(([127, 0, 1, n], 15443)),
            locality: locality.parse().unwrap(),
            labels: Default::default(),
            live,
            subsets: vec![],
        };
        let entry = ServiceEntry {
            key: "shop/web".parse().unwrap(),
            ports: vec![ServicePort {
                port: 80,
                protocol: Protocol::Http,
                name: None,
            }],
            endpoints: vec![],
            endpoint_info: Default::default(),
            subsets: vec![],
            remote: vec![
                gateway("a", "r", 1, false),
                gateway("b", "elsewhere", 2, true),
            ],
            exported: false,
            allowed_callers: None,
            passthrough: false,
            headless: false,
            headless_endpoints: vec![],
        };
        let catalog = Catalog::new([entry]);
        let doc = serde_json::to_value(u.explain(&catalog, &"shop/web".parse().unwrap()).unwrap())
            .unwrap();
        let levels = doc["destinations"][0]["levels"].as_array().unwrap();
        assert_eq!(levels.len(), 2, "{doc:#}");
        let a = &levels[0]["targets"][0];
        assert_eq!(
            (a["cluster"].as_str(), a["state"].as_str()),
            (Some("a"), Some("down"))
        );
        assert_eq!(a["load_percent"], 0.0);
        let reasons = a["reasons"].to_string();
        assert!(reasons.contains("lease lapsed"), "{reasons}");
        assert_eq!(levels[0]["reason"], "same region");
        assert_eq!(levels[1]["reason"], "elsewhere");
        assert_eq!(levels[1]["load_percent"], 100.0);
        assert!(u.explain(&catalog, &"shop/nope".parse().unwrap()).is_none());
    }
}
