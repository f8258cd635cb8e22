//! Where a request goes: pure functions over a catalog snapshot.

use std::net::SocketAddr;

use isthmus_federation::catalog::{Addressed, Catalog, Protocol, RemoteGateway, ServiceEntry};

/// Where to send one attempt of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An endpoint in this cluster.
    Local(SocketAddr),
    /// A peer gateway in another cluster.
    Remote(RemoteGateway),
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
}

impl NoRoute {
    /// HTTP status for the client.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownService | Self::UnknownPort => 404,
            Self::NoEndpoint => 503,
        }
    }
}

/// A routed request: the service, its port, and the protocol to speak upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The catalog entry.
    pub entry: ServiceEntry,
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

/// Picks the target for attempt `attempt` of a request, spreading requests by
/// `spread` (a rotating counter): endpoints in this cluster first, then peer
/// gateways. Locality-aware failover across gateways comes with issue 6.
pub fn pick(
    entry: &ServiceEntry,
    local_only: bool,
    spread: usize,
    attempt: usize,
) -> Result<Target, NoRoute> {
    let n = spread.wrapping_add(attempt);
    if !entry.endpoints.is_empty() {
        return Ok(Target::Local(entry.endpoints[n % entry.endpoints.len()]));
    }
    if local_only || entry.remote.is_empty() {
        return Err(NoRoute::NoEndpoint);
    }
    Ok(Target::Remote(entry.remote[n % entry.remote.len()].clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_federation::catalog::{ServiceKey, ServicePort, parse_authority};

    fn entry(endpoints: &[&str], remote: usize) -> ServiceEntry {
        ServiceEntry {
            key: "shop/web".parse::<ServiceKey>().unwrap(),
            ports: vec![
                ServicePort {
                    port: 80,
                    protocol: Protocol::Http,
                },
                ServicePort {
                    port: 9090,
                    protocol: Protocol::Grpc,
                },
            ],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            remote: (0..remote)
                .map(|i| RemoteGateway {
                    cluster: format!("c{i}").parse().unwrap(),
                    spiffe_id: format!("spiffe://c{i}.example/isthmus/gateway/gw")
                        .parse()
                        .unwrap(),
                    address: format!("127.0.0.{}:15443", i + 2).parse().unwrap(),
                    locality: "r".parse().unwrap(),
                })
                .collect(),
            exported: true,
            allowed_callers: None,
            passthrough: false,
        }
    }

    #[test]
    fn resolves_ports_and_protocols() {
        let catalog = Catalog::new([entry(&["127.0.0.1:1"], 0)]);
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

    #[test]
    fn prefers_local_endpoints_and_spreads_over_them() {
        let e = entry(&["127.0.0.1:1", "127.0.0.1:2"], 1);
        assert_eq!(
            pick(&e, false, 0, 0),
            Ok(Target::Local("127.0.0.1:1".parse().unwrap()))
        );
        assert_eq!(
            pick(&e, false, 0, 1),
            Ok(Target::Local("127.0.0.1:2".parse().unwrap()))
        );
        assert_eq!(
            pick(&e, false, 1, 0),
            Ok(Target::Local("127.0.0.1:2".parse().unwrap()))
        );
    }

    #[test]
    fn goes_remote_only_without_local_endpoints_and_never_from_east_west() {
        let e = entry(&[], 2);
        assert!(
            matches!(pick(&e, false, 0, 0), Ok(Target::Remote(g)) if g.cluster.as_str() == "c0")
        );
        assert!(
            matches!(pick(&e, false, 0, 1), Ok(Target::Remote(g)) if g.cluster.as_str() == "c1")
        );
        assert_eq!(pick(&e, true, 0, 0), Err(NoRoute::NoEndpoint));
        assert_eq!(pick(&entry(&[], 0), false, 0, 0).unwrap_err().status(), 503);
    }
}
