//! The HTTP data plane on Pingora.
//!
//! - [`outbound`]: plain HTTP/1.1 and h2c from local workloads, routed by
//!   `Host`/`:authority` (`<svc>.<ns>.svc.clusterset.local[:port]`) to an endpoint
//!   in this cluster or, through the mesh, to a peer gateway;
//! - [`east_west`]: SPIFFE mTLS from peer gateways, routed by SNI to endpoints of
//!   exported services in this cluster (never onwards, so nothing loops);
//! - [`tcp`]: L4 for TCP service ports and passthrough.
//!
//! The HTTP listeners share their request phases ([`common`]); every listener
//! gets the same [`Runtime`], built once. Routing decisions are pure functions
//! ([`routing`]) tested without sockets; where each attempt goes is
//! planned by [`crate::upstream::balance`].

pub mod common;
pub mod east_west;
mod headers;
mod metrics;
pub mod outbound;
pub mod routing;
pub mod tcp;

pub use metrics::{Direction, L4Result, ProxyMetrics, RequestError, TcpMetrics};

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use isthmus_federation::trust::SpiffeConnector;
use isthmus_federation::{Catalog, ClusterName, TrustDomain};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

use crate::config::Config;
use crate::health::Drain;
use crate::mesh::MeshConnector;
use crate::upstream::Upstreams;

/// What every listener of the data plane shares: built once at start-up and
/// handed whole (behind an `Arc`) to each listener's constructor.
pub struct Runtime {
    /// The catalog in force, swapped whole on every change.
    pub catalog: Arc<ArcSwap<Catalog>>,
    /// Backends and their protection.
    pub upstreams: Arc<Upstreams>,
    /// Requests and TCP streams in flight, waited for on stop.
    pub drain: Arc<Drain>,
    /// This gateway's cluster (the destination of requests served here, and
    /// the source of those from local workloads).
    pub cluster: ClusterName,
    /// This gateway's trust domain (the source trust domain of requests from
    /// local workloads).
    pub trust_domain: TrustDomain,
    /// HTTP request metrics.
    pub metrics: ProxyMetrics,
    /// L4 connection metrics.
    pub tcp_metrics: TcpMetrics,
    /// Opens the connections through which HTTP requests reach peer
    /// gateways; without one, the outbound listeners route to endpoints in
    /// this cluster only.
    pub mesh: Option<Arc<MeshConnector>>,
    /// Opens L4 connections (one mTLS connection per stream) to peer
    /// gateways; without one (no identity), TCP ports reach endpoints in this
    /// cluster only.
    pub peers: Option<SpiffeConnector>,
    /// The configuration in force (swapped on reload): the access log's
    /// `log.access_sample`.
    pub config: Arc<ArcSwap<Config>>,
    /// Request spans: the sampler and export queue in force.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

impl Runtime {
    /// The source of requests and connections from local workloads: this
    /// cluster and trust domain.
    pub(crate) fn local_source(&self) -> metrics::Source<'_> {
        metrics::Source {
            cluster: self.cluster.as_str(),
            trust_domain: self.trust_domain.as_str(),
        }
    }
}

/// How long idle HTTP/1.1 keep-alive connections stay open after the
/// listeners close (on stop and on upgrade). A client's next request on one
/// is still served, with `Connection: close`; closing it at once instead races
/// with a request already on its way, which then fails.
pub const KEEPALIVE_LINGER: Duration = Duration::from_secs(1);

/// Serves `A` (a Pingora HTTP proxy) and, once its listener has closed, waits
/// [`KEEPALIVE_LINGER`] before the proxy closes its idle connections.
pub struct Lingering<A>(pub Arc<A>);

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Lingering<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.0.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        tokio::time::sleep(KEEPALIVE_LINGER).await;
        self.0.cleanup().await;
    }
}
