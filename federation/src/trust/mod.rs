//! Trust: X509-SVIDs, per-trust-domain bundles, SPIFFE verification for rustls,
//! rotation, SPIFFE federation bundle endpoints, and development PKI.

pub mod bundle;
pub mod ca;
pub mod x509;

pub use bundle::{BundleError, TrustBundle};
pub use x509::{CertError, CertInfo, KeyUsage};
pub mod store;
pub mod svid;
pub mod tls;

pub use store::{BundleSource, DomainTrust, TrustStore};
pub use svid::{Svid, SvidError};
pub use tls::{
    HandshakeError, HandshakeMetrics, HandshakeResult, HandshakeSide, PeerPolicy, SpiffeAcceptor,
    SpiffeConnector, TlsMaterial,
};
pub mod files;

pub use files::{
    BundleFile, BundleRole, FileMaterial, MaterialError, MaterialFiles, MaterialKind,
    MaterialMetrics,
};
pub mod endpoint;

pub use endpoint::{
    BundleEndpoint, BundleFetcher, EndpointProfile, FetchError, FetchMetrics, FetchResult,
};
