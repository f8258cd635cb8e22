//! Gateway-to-gateway transport: SPIFFE mTLS streams that Pingora can drive.
//!
//! Pingora's rustls connector verifies DNS names only, and its listener cannot
//! count every failed handshake. Isthmus therefore owns the TLS of the east-west
//! hop and hands Pingora an already-authenticated stream:
//! - upstream, [`mesh_peer`] builds the `HttpPeer` whose custom L4 connector
//!   ([`MeshConnect`]) asks the in-process [`MeshRelay`] for a connection: the
//!   relay opens TCP to the peer gateway and runs `SpiffeConnector` (the peer's
//!   SPIFFE ID checked against its trust domain's bundle, the service SNI sent,
//!   the outcome counted). Pingora sees a plaintext h2c peer and pools and
//!   multiplexes HTTP/2 over it; the TLS underneath is ours. (The relay exists
//!   because Pingora 0.9 never reuses custom virtual sockets; see `relay`.)
//! - downstream, the east-west listener accepts plain TCP, runs `SpiffeAcceptor`
//!   and wraps the result in [`MeshTlsStream`], which implements Pingora's `IO`
//!   traits (negotiated ALPN; a TLS digest whose `cert_digest` is the SHA-256 of
//!   the peer's leaf) so Pingora's HTTP server runs on it.

mod connect;
mod hello;
mod relay;
mod stream;

pub use connect::{MeshConnect, mesh_peer};
pub use hello::{HelloRecorder, MAX_CLIENT_HELLO};
pub use relay::{MeshAlpn, MeshRelay};
pub use stream::{EastWestIo, MeshTlsStream};
