//! What a request addresses, resolved against a catalog snapshot; where each
//! attempt goes is [`crate::upstream::balance`]'s.

use isthmus_federation::catalog::{Addressed, Catalog, Protocol, ServiceEntry};

/// Why a request cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// The authority names no known service.
    #[error("no such service")]
    UnknownService,
    /// The service has no such port (or several ports and none was given).
    #[error("no such port on this service")]
    UnknownPort,
}

impl NoRoute {
    /// HTTP status for the client. (When the service is known but no target
    /// can take the request, planning says why: see
    /// [`crate::upstream::balance::NoTarget`].)
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownService | Self::UnknownPort => 404,
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

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_federation::catalog::{ServiceKey, ServicePort, parse_authority};

    fn entry(endpoints: &[&str]) -> ServiceEntry {
        ServiceEntry {
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
            ..ServiceEntry::exported("shop/web".parse::<ServiceKey>().unwrap())
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
