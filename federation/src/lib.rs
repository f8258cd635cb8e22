//! The Isthmus control plane: identities and trust domains, the federated service
//! catalog model, discovery sources, the peering protocol and the DNS server.
//!
//! This crate knows nothing about Pingora; the data plane (`isthmus-gateway`) reads
//! what this crate publishes. Every name that crosses a trust boundary (configuration,
//! peering messages, DNS) is parsed into a checked newtype here, so the rest of the
//! code never handles an unvalidated string.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod discovery;
pub mod dns;
pub mod identity;
pub mod labels;
pub mod limits;
pub mod locality;
pub mod names;
pub mod peering;
pub mod trust;

pub use catalog::{Catalog, ServiceKey};
pub use identity::{SpiffeId, SpiffeIdError, TrustDomain, TrustDomainError};
pub use locality::{Locality, LocalityError};
pub use names::{ClusterName, GatewayName, Hostname, NameError, Namespace, PortName, ServiceName};
