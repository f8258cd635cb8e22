//! Active health checks: every backend address in the catalog is probed at
//! the configured interval, whether or not it carries traffic, so a dead
//! backend is avoided before a request finds out and a recovered one returns
//! without waiting for its ejection to end.
//!
//! - an endpoint in this cluster must accept a TCP connection;
//! - a peer gateway must complete an mTLS handshake proving the SPIFFE ID the
//!   catalog expects of it (a live port answered by the wrong party fails).
//!
//! Results are kept by identity: a peer gateway's probe failing at an address
//! that also hosts an endpoint here marks only that peer down.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_federation::SpiffeId;
use isthmus_federation::catalog::Catalog;
use isthmus_federation::trust::{PeerPolicy, SpiffeConnector};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{BackendRef, ByBackend, Upstreams};

/// SNI of a probe: names no service, so the peer terminates TLS and then
/// sees the connection close.
const PROBE_SNI: &str = "health-check.isthmus.invalid";

/// What to probe at one address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Probe {
    Endpoint(SocketAddr),
    Gateway(SocketAddr, SpiffeId),
}

impl Probe {
    fn addr(&self) -> SocketAddr {
        match self {
            Probe::Endpoint(a) | Probe::Gateway(a, _) => *a,
        }
    }

    /// Whose health it checks.
    fn backend(&self) -> BackendRef<'_> {
        match self {
            Probe::Endpoint(a) => BackendRef::endpoint(*a),
            Probe::Gateway(a, id) => BackendRef::gateway(*a, id),
        }
    }
}

/// Probes every backend in the catalog; a Pingora background service.
pub struct HealthChecker {
    upstreams: Arc<Upstreams>,
    catalog: Arc<ArcSwap<Catalog>>,
    /// Reaches peer gateways; without an identity only endpoints are probed.
    connector: Option<SpiffeConnector>,
}

impl HealthChecker {
    /// A checker of `catalog`'s backends, recording into `upstreams`.
    pub fn new(
        upstreams: Arc<Upstreams>,
        catalog: Arc<ArcSwap<Catalog>>,
        connector: Option<SpiffeConnector>,
    ) -> Self {
        Self {
            upstreams,
            catalog,
            connector,
        }
    }

    /// Every backend to probe now; forgets state of backends gone from the catalog.
    fn targets(&self) -> BTreeSet<Probe> {
        let catalog = self.catalog.load();
        let mut probes = BTreeSet::new();
        for entry in catalog.iter() {
            probes.extend(entry.endpoints.iter().copied().map(Probe::Endpoint));
            if self.connector.is_some() {
                probes.extend(
                    entry
                        .remote
                        .iter()
                        .map(|g| Probe::Gateway(g.address, g.spiffe_id.clone())),
                );
            }
        }
        let services: Vec<_> = catalog.iter().map(|e| e.key.clone()).collect();
        let mut live = ByBackend::default();
        for entry in catalog.iter() {
            for addr in &entry.endpoints {
                live.insert(BackendRef::endpoint(*addr), ());
            }
            for gw in &entry.remote {
                live.insert(BackendRef::gateway(gw.address, &gw.spiffe_id), ());
            }
        }
        self.upstreams.retain(&services, &live);
        probes
    }

    /// One probe; `Err` says why it failed.
    async fn probe(
        connector: Option<SpiffeConnector>,
        probe: Probe,
        timeout: Duration,
    ) -> Result<(), String> {
        let attempt = async {
            let tcp = TcpStream::connect(probe.addr())
                .await
                .map_err(|e| e.to_string())?;
            if let (Probe::Gateway(_, id), Some(connector)) = (&probe, connector) {
                let sni = ServerName::try_from(PROBE_SNI).expect("static name is valid");
                connector
                    .connect_with_alpn(tcp, sni, PeerPolicy::exact(id.clone()), Vec::new())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    async fn round(&self) {
        let policy = self.upstreams.policy();
        let hc = &policy.health_check;
        let mut probes = JoinSet::new();
        for probe in self.targets() {
            let connector = self.connector.clone();
            let timeout = hc.timeout;
            probes.spawn(async move {
                let result = Self::probe(connector, probe.clone(), timeout).await;
                (probe, result)
            });
        }
        while let Some(Ok((probe, result))) = probes.join_next().await {
            let backend = probe.backend();
            let flipped = self.upstreams.health_checked(
                backend,
                result.is_ok(),
                hc.unhealthy_threshold,
                hc.healthy_threshold,
            );
            match (flipped, result) {
                (true, Ok(())) => info!(%backend, "backend passes health checks again"),
                (true, Err(e)) => {
                    warn!(%backend, error = %e, "backend fails health checks; traffic avoids it")
                }
                (false, _) => {}
            }
        }
    }
}

#[async_trait::async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let interval = self.upstreams.policy().health_check.interval;
            let pause = if interval.is_zero() {
                // Off: no address stays marked down by old results; look
                // again in a while in case a reload turns checks on.
                self.upstreams.forget_health();
                Duration::from_secs(1)
            } else {
                self.round().await;
                interval
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
