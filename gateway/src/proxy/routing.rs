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

/// Picks the target for the next attempt of a request.
///
/// Endpoints in this cluster come first, then peer gateways (never from the
/// east-west listener: `local_only`). Within the first tier that has targets
/// `Up`, targets not yet `tried` by this request are preferred, spread by
/// `spread` (a rotating counter). When nothing is up anywhere, a target that is
/// merely `Down` is used anyway (panic mode: failing checks are better than a
/// sure error); when every target is `Full`, the request is refused.
/// Locality-aware failover across gateways comes with issue 6.
pub fn pick(
    entry: &ServiceEntry,
    local_only: bool,
    spread: usize,
    tried: &[SocketAddr],
    availability: impl Fn(SocketAddr) -> Availability,
) -> Result<Target, NoRoute> {
    let remote: &[RemoteGateway] = if local_only { &[] } else { &entry.remote };
    if entry.endpoints.is_empty() && remote.is_empty() {
        return Err(NoRoute::NoEndpoint);
    }
    // Addresses are rated once; only the chosen target is built (a gateway
    // carries strings worth not cloning for every candidate of every request).
    let tiers: [Vec<(SocketAddr, Availability)>; 2] = [
        entry
            .endpoints
            .iter()
            .map(|a| (*a, availability(*a)))
            .collect(),
        remote
            .iter()
            .map(|g| (g.address, availability(g.address)))
            .collect(),
    ];
    let choose = |wanted: Availability| -> Option<(usize, usize)> {
        tiers.iter().enumerate().find_map(|(tier, rated)| {
            let candidates = || {
                rated
                    .iter()
                    .enumerate()
                    .filter(move |(_, (_, a))| *a == wanted)
            };
            let fresh = || candidates().filter(|(_, (addr, _))| !tried.contains(addr));
            let turn = spread.wrapping_add(tried.len());
            let n_fresh = fresh().count();
            let chosen = if n_fresh > 0 {
                fresh().nth(turn % n_fresh)
            } else {
                let n = candidates().count();
                candidates().nth(turn % n.max(1))
            };
            chosen.map(|(i, _)| (tier, i))
        })
    };
    choose(Availability::Up)
        .or_else(|| choose(Availability::Down))
        .map(|(tier, i)| match tier {
            0 => Target::Local(entry.endpoints[i]),
            _ => Target::Remote(remote[i].clone()),
        })
        .ok_or(NoRoute::Overloaded)
}

impl Target {
    /// The address connected to.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Local(a) => *a,
            Target::Remote(g) => g.address,
        }
    }
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
                    name: None,
                },
                ServicePort {
                    port: 9090,
                    protocol: Protocol::Grpc,
                    name: None,
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
            headless: false,
            headless_endpoints: vec![],
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

    fn up(_: SocketAddr) -> Availability {
        Availability::Up
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefers_local_endpoints_and_spreads_over_them() {
        let e = entry(&["127.0.0.1:1", "127.0.0.1:2"], 1);
        assert_eq!(
            pick(&e, false, 0, &[], up),
            Ok(Target::Local(addr("127.0.0.1:1")))
        );
        assert_eq!(
            pick(&e, false, 1, &[], up),
            Ok(Target::Local(addr("127.0.0.1:2")))
        );
        // A retry goes to an endpoint not tried yet, whatever the spread.
        for spread in 0..4 {
            assert_eq!(
                pick(&e, false, spread, &[addr("127.0.0.1:2")], up),
                Ok(Target::Local(addr("127.0.0.1:1")))
            );
        }
    }

    #[test]
    fn goes_remote_only_without_local_endpoints_and_never_from_east_west() {
        let e = entry(&[], 2);
        assert!(
            matches!(pick(&e, false, 0, &[], up), Ok(Target::Remote(g)) if g.cluster.as_str() == "c0")
        );
        assert!(
            matches!(pick(&e, false, 1, &[], up), Ok(Target::Remote(g)) if g.cluster.as_str() == "c1")
        );
        assert_eq!(pick(&e, true, 0, &[], up), Err(NoRoute::NoEndpoint));
        assert_eq!(
            pick(&entry(&[], 0), false, 0, &[], up)
                .unwrap_err()
                .status(),
            503
        );
    }

    #[test]
    fn avoids_down_and_full_backends_and_fails_over_to_peers() {
        let e = entry(&["127.0.0.1:1", "127.0.0.1:2"], 1);
        let one_down = |a: SocketAddr| {
            if a == addr("127.0.0.1:1") {
                Availability::Down
            } else {
                Availability::Up
            }
        };
        for spread in 0..4 {
            assert_eq!(
                pick(&e, false, spread, &[], one_down),
                Ok(Target::Local(addr("127.0.0.1:2")))
            );
        }
        // Every local endpoint down or full: the peer gateway takes over.
        let locals_out = |a: SocketAddr| match a.port() {
            1 => Availability::Down,
            2 => Availability::Full,
            _ => Availability::Up,
        };
        assert!(matches!(
            pick(&e, false, 0, &[], locals_out),
            Ok(Target::Remote(_))
        ));
        // From east-west there is no peer to fail over to: panic mode uses the
        // down endpoint rather than refusing.
        assert_eq!(
            pick(&e, true, 0, &[], locals_out),
            Ok(Target::Local(addr("127.0.0.1:1")))
        );
        // Everything at its limits: refused at once.
        let full = |_| Availability::Full;
        assert_eq!(pick(&e, false, 0, &[], full), Err(NoRoute::Overloaded));
    }
}
