//! The hub's tests, by concern, with the helpers they share.

mod admission;
mod debug;
mod exports;
mod labels;
mod leases;
mod recompute;
mod resume;

use super::*;
use crate::peering::authority::Grant;

fn hello(name: &str, incarnation: u64) -> PeerHello {
    PeerHello {
        spiffe_id: format!("spiffe://{name}.example/isthmus/gateway/gw")
            .parse()
            .unwrap(),
        cluster: name.parse().unwrap(),
        locality: "r".parse().unwrap(),
        east_west: Some(([127, 0, 0, 9], 15443).into()),
        incarnation,
        lease: Duration::from_millis(500),
        labels: Default::default(),
        weight: 1,
    }
}

fn me() -> PeerHello {
    PeerHello {
        east_west: Some(([127, 0, 0, 1], 15443).into()),
        ..hello("me", 1)
    }
}

fn export(key: &str) -> Export {
    Export {
        key: key.parse().unwrap(),
        ports: vec![crate::catalog::ServicePort {
            port: 80,
            protocol: crate::catalog::Protocol::Http,
            name: None,
        }],
        export_time_millis: 1,
        headless: false,
        endpoints: vec![],
        subsets: vec!["v2".into()],
    }
}

/// This cluster's exported service `key` at `endpoint`, exported at
/// `export_time_millis`.
fn local(key: &str, endpoint: std::net::SocketAddr, export_time_millis: u64) -> LocalService {
    let mut export = export(key);
    export.export_time_millis = export_time_millis;
    LocalService {
        export,
        endpoints: vec![endpoint],
        endpoint_info: BTreeMap::new(),
        subsets: vec![],
        exported: true,
        allowed_callers: None,
        passthrough: false,
    }
}

/// A hub for `me` with no authority set yet; `state_file` keeps its export
/// times across restarts.
fn hub(limits: PeeringLimits, state_file: Option<PathBuf>) -> Arc<Hub> {
    hub_as(me(), limits, state_file)
}

/// A hub for the gateway `me`.
fn hub_as(me: PeerHello, limits: PeeringLimits, state_file: Option<PathBuf>) -> Arc<Hub> {
    let metrics = PeeringMetrics::new(&prometheus::Registry::new()).unwrap();
    Hub::new(
        me,
        Duration::from_secs(30),
        Arc::new(ArcSwap::default()),
        None,
        limits,
        state_file,
        metrics,
    )
}

/// A hub for `me` that grants each of `peers` its own cluster (named as
/// the peer) and `imports`.
fn hub_with(peers: &[&PeerHello], imports: &[&str], limits: PeeringLimits) -> Arc<Hub> {
    let hub = hub(limits, None);
    grant(&hub, peers, imports);
    hub
}

/// Grants each of `peers` its own cluster (named as the peer) and
/// `imports`, replacing `hub`'s authority.
fn grant(hub: &Hub, peers: &[&PeerHello], imports: &[&str]) {
    hub.set_authority(PeerAuthority {
        peers: peers
            .iter()
            .map(|p| {
                let grant = Grant {
                    clusters: [p.cluster.clone()].into(),
                    localities: vec![],
                    imports: ServicePatterns::new(
                        imports.iter().map(|s| (*s).to_owned()).collect(),
                    ),
                    exports: None,
                };
                (p.spiffe_id.clone(), grant)
            })
            .collect(),
        ..PeerAuthority::default()
    });
}

/// Why `hub` refuses `hello`'s session.
fn refusal(hub: &Arc<Hub>, hello: &PeerHello) -> HelloRefusal {
    hub.session_open(hello).unwrap_err().reason
}

fn refused(hub: &Hub, reason: &str) -> u64 {
    hub.metrics().refused.with_label_values(&[reason]).get()
}

/// Whether the peer gateway serving shop/web is live in the catalog.
fn live(hub: &Hub) -> Option<bool> {
    let catalog = hub.catalog().load();
    let entry = catalog.get(&"shop/web".parse().unwrap())?;
    Some(entry.remote.first()?.live)
}
