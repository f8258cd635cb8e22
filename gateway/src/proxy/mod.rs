//! The HTTP data plane on Pingora.
//!
//! - [`outbound`]: plain HTTP/1.1 and h2c from local workloads, routed by
//!   `Host`/`:authority` (`<svc>.<ns>.svc.clusterset.local[:port]`) to an endpoint
//!   in this cluster or, through the mesh, to a peer gateway;
//! - [`east_west`]: SPIFFE mTLS from peer gateways, routed by SNI to endpoints of
//!   exported services in this cluster (never onwards, so nothing loops);
//! - [`tcp`]: L4 for TCP service ports and passthrough.
//!
//! Routing decisions are pure functions ([`routing`]) tested without sockets;
//! where each attempt goes is planned by [`crate::upstream::balance`].

pub mod east_west;
mod headers;
mod metrics;
pub mod outbound;
pub mod routing;
pub mod tcp;

pub use metrics::{ProxyMetrics, TcpMetrics};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

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
