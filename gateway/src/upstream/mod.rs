//! Backends and their protection: which targets of a service may take
//! traffic now, and what each request or connection did to them.
//!
//! A backend is one address serving one service: an endpoint in this cluster
//! or a peer gateway. Each has
//! - circuit-breaker counters (requests in flight, requests waiting for a
//!   connection, L4 connections) held by RAII leases;
//! - passive outlier state ([`outlier`]) fed by every outcome;
//! - active health ([`probe`]), shared by every service at that address.
//!
//! Picking a target ([`crate::proxy::routing::pick`]) stays a pure function;
//! this module only answers "how available is this address" for it.

mod budget;
pub mod outlier;
pub mod probe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use isthmus_federation::ServiceKey;
use prometheus::{IntCounterVec, IntGaugeVec, Registry};
use serde::Serialize;
use tracing::warn;

pub use self::budget::RetryBudget;
use self::outlier::{Outcome, Outlier, may_eject_another};
use crate::config::upstream::UpstreamConfig;
use crate::metrics;
use crate::proxy::routing::Availability;

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
}

impl Default for Health {
    fn default() -> Self {
        // Healthy until probes say otherwise: a new backend gets traffic at once.
        Self {
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
        }
    }
}

impl Health {
    /// Whether active checks consider the address healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
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
                "Retries by service, namespace and reason (connect, after_send, budget_exhausted: a retry the budget refused).",
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
        }
    }
}

/// Every backend the data plane has used, with the policy that protects them.
pub struct Upstreams {
    policy: ArcSwap<UpstreamConfig>,
    services: RwLock<HashMap<ServiceKey, Arc<ServiceBackends>>>,
    health: RwLock<HashMap<SocketAddr, Arc<Health>>>,
    metrics: UpstreamMetrics,
}

impl Upstreams {
    /// Backends protected by `policy`, with metrics in `registry`.
    pub fn new(policy: UpstreamConfig, registry: &Registry) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            services: RwLock::default(),
            health: RwLock::default(),
            metrics: UpstreamMetrics::new(registry),
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

    /// How available `service`'s backend at `addr` is for `usage` now.
    pub fn availability(
        &self,
        service: &ServiceBackends,
        addr: SocketAddr,
        usage: Use,
        now: Instant,
        policy: &UpstreamConfig,
    ) -> Availability {
        let known = service
            .backends
            .read()
            .expect("backends lock")
            .get(&addr)
            .map(|b| b.availability(now, policy, usage));
        known.unwrap_or_else(|| {
            // Never used by this service: only active health can speak against it.
            let healthy = self
                .health
                .read()
                .expect("health lock")
                .get(&addr)
                .is_none_or(|h| h.is_healthy());
            if healthy {
                Availability::Up
            } else {
                Availability::Down
            }
        })
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
