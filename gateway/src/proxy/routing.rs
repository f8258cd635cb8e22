//! What a request addresses, resolved against a catalog snapshot; where each
//! attempt goes is [`super::balance`]'s.

use std::net::SocketAddr;

use isthmus_federation::catalog::{Addressed, Catalog, Protocol, RemoteGateway, ServiceEntry};

use crate::upstream::BackendRef;

/// Where to send one attempt of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An endpoint in this cluster.
    Local(SocketAddr),
    /// A peer gateway in another cluster.
    Remote(RemoteGateway),
}

/// How available a target is for one more request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Healthy and below its limits.
    Up,
    /// Healthy but at a circuit-breaker limit.
    Full,
    /// Failing active health checks, or ejected by outlier detection.
    Down,
}

/// Why a request cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// The authority names no known service.
    #[error("no such service")]
    UnknownService,
    /// The service has no such port (or several ports and none was given).
    #[error("no such port on this service")]
    UnknownPort,
    /// Known, but nothing serves it now.
    #[error("no endpoint serves this service")]
    NoEndpoint,
    /// Every backend is at a circuit-breaker limit.
    #[error("every backend of this service is at its limits")]
    Overloaded,
}

impl NoRoute {
    /// HTTP status for the client.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownService | Self::UnknownPort => 404,
            Self::NoEndpoint | Self::Overloaded => 503,
        }
    }
}

/// A routed request: the service, its port, and the protocol to speak upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The catalog entry.
    pub entry: std::sync::Arc<ServiceEntry>,
    /// The port addressed.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// Resolves what the client addressed against the catalog.
pub fn resolve(catalog: &Catalog, addressed: &Addressed) -> Result<Routed, NoRoute> {
    let entry = catalog.get(&addressed.key).ok_or(NoRoute::UnknownService)?;
    let port = entry.port(addressed.port).ok_or(NoRoute::UnknownPort)?;
    Ok(Routed {
        entry: entry.clone(),
        port: port.port,
        protocol: port.protocol,
    })
}

impl Target {
    /// The address connected to.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Local(a) => *a,
            Target::Remote(g) => g.address,
        }
    }

    /// Who it is: its address and, for a peer gateway, the SPIFFE ID it must
    /// prove. Backend state is kept by this, never by the address alone.
    pub fn backend(&self) -> BackendRef<'_> {
        match self {
            Target::Local(a) => BackendRef::endpoint(*a),
            Target::Remote(g) => BackendRef::gateway(g.address, &g.spiffe_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_federation::catalog::{ServiceKey, ServicePort, parse_authority};

    fn entry(endpoints: &[&str]) -> ServiceEntry {
        ServiceEntry {
            key: "shop/web".parse::<ServiceKey>().unwrap(),
            ports: vec![
                ServicePort {
                    port: 80,
                    protocol: Protocol::Http,
                    name: None,
                },
                ServicePort {
                    port: 9090,
                    protocol: Protocol::Grpc,
                    name: None,
                },
            ],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            endpoint_info: Default::default(),
            subsets: vec![],
            remote: vec![],
            exported: true,
            allowed_callers: None,
            passthrough: false,
            headless: false,
            headless_endpoints: vec![],
        }
    }

    #[test]
    fn resolves_ports_and_protocols() {
        let catalog = Catalog::new([entry(&["127.0.0.1:1"])]);
        let routed = resolve(
            &catalog,
            &parse_authority("web.shop.svc.clusterset.local:9090").unwrap(),
        )
        .unwrap();
        assert_eq!((routed.port, routed.protocol), (9090, Protocol::Grpc));
        let no_port = parse_authority("web.shop.svc.clusterset.local").unwrap();
        assert_eq!(
            resolve(&catalog, &no_port),
            Err(NoRoute::UnknownPort),
            "two ports, none given"
        );
        let unknown = parse_authority("api.shop.svc.clusterset.local:80").unwrap();
        assert_eq!(resolve(&catalog, &unknown).unwrap_err().status(), 404);
    }
}
