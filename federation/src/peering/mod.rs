//! The peering protocol `isthmus.federation.v1`: gateways exchange hellos,
//! their exported catalogs (a snapshot, then versioned deltas, each ACKed or
//! NACKed), trust bundles and lease renewals over one bidirectional gRPC
//! stream on mTLS. See `proto/isthmus/federation/v1/federation.proto`.

pub mod authority;
pub mod convert;
pub mod hub;
pub mod metrics;
pub mod session;
mod state;
pub mod transport;

/// The generated protocol types, client and server.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    unused_qualifications
)]
pub mod proto {
    tonic::include_proto!("isthmus.federation.v1");
}

pub use authority::{Grant, PeerAuthority, PeeringLimits, ServicePatterns};
pub use convert::{ConvertError, PeerHello};
pub use hub::{
    BundleOutcome, ExportRefusal, ExportSet, HelloRefusal, HelloRefused, Hub, LeaseState, Refusal,
};
pub use metrics::PeeringMetrics;
pub use transport::{PeerTarget, dial, incarnation, serve};
