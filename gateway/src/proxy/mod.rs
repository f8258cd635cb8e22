//! The HTTP data plane on Pingora.
//!
//! - [`outbound`]: plain HTTP/1.1 and h2c from local workloads, routed by
//!   `Host`/`:authority` (`<svc>.<ns>.svc.clusterset.local[:port]`) to an endpoint
//!   in this cluster or, through the mesh, to a peer gateway;
//! - [`east_west`]: SPIFFE mTLS from peer gateways, routed by SNI to endpoints of
//!   exported services in this cluster (never onwards, so nothing loops);
//! - [`tcp`]: L4 for TCP service ports and passthrough.
//!
//! Routing decisions are pure functions ([`routing`]) tested without sockets.

pub mod balance;
pub mod east_west;
mod headers;
mod metrics;
pub mod outbound;
pub mod routing;
pub mod tcp;

pub use metrics::{ProxyMetrics, TcpMetrics};
