//! The MCS merge: this cluster's services and every peer's exports become one
//! catalog.
//!
//! Rules (Kubernetes Multi-Cluster Services, KEP-1645):
//! - namespace sameness: `(namespace, name)` is one service in every cluster;
//! - the ports are the union of every cluster's ports;
//! - where clusters disagree (a port's protocol or name, headless or not) the
//!   oldest export wins, ties broken by cluster name, and the conflict is
//!   reported rather than silently resolved;
//! - except that a service defined here keeps its local definition: a peer
//!   can add its gateways as targets, but never change the ports, protocols
//!   or headlessness of a service this cluster serves (its disagreements are
//!   reported as conflicts, and its extra ports are left out);
//! - the gateways of one cluster (replicas) are one participant: their
//!   definitions are joined first (see [`cluster_definitions`]), so replicas
//!   never conflict with each other, only clusters do;
//! - each remote gateway entry names its cluster of origin, and only services
//!   with endpoints in this cluster are exported, so nothing learned from a
//!   peer is ever passed on (no loops).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use super::{
    Catalog, EndpointInfo, HeadlessEndpoint, RemoteGateway, ServiceEntry, ServiceKey, ServicePort,
    Subset, served_subsets,
};
use crate::trust::PeerPolicy;
use crate::{ClusterName, SpiffeId};

/// One cluster's definition of a service: what a peer exported, or what a
/// discovery source found here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Export {
    /// The service.
    pub key: ServiceKey,
    /// Its ports in that cluster.
    pub ports: Vec<ServicePort>,
    /// When that cluster first exported it (Unix milliseconds); the oldest
    /// export wins a conflict.
    pub export_time_millis: u64,
    /// Headless: DNS publishes the endpoints instead of a clusterset IP.
    pub headless: bool,
    /// The endpoints DNS publishes, for a headless service.
    pub endpoints: Vec<HeadlessEndpoint>,
    /// The subsets that cluster has endpoints for (set by [`export_set`]).
    pub subsets: Vec<String>,
}

/// A service of this cluster, as the discovery sources found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    /// Its definition here.
    pub export: Export,
    /// Its endpoints here.
    pub endpoints: Vec<SocketAddr>,
    /// Locality, labels and weight of the endpoints that have any.
    pub endpoint_info: BTreeMap<SocketAddr, EndpointInfo>,
    /// Its subsets.
    pub subsets: Vec<Subset>,
    /// Exported to peers (MCS ServiceExport).
    pub exported: bool,
    /// Who may reach it through the east-west listener.
    pub allowed_callers: Option<PeerPolicy>,
    /// East-west TLS passthrough.
    pub passthrough: bool,
}

/// What one peer gateway serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCatalog {
    /// The gateway, and the cluster behind it.
    pub gateway: RemoteGateway,
    /// The services it exports.
    pub services: BTreeMap<ServiceKey, Export>,
}

/// Clusters that disagree on part of a service's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The service.
    pub service: ServiceKey,
    /// What they disagree on, e.g. `port 8080 protocol`.
    pub field: String,
    /// The value in use, from the oldest export.
    pub chosen: String,
    /// The cluster it came from.
    pub chosen_from: ClusterName,
    /// The values not used, with their clusters.
    pub rejected: Vec<(ClusterName, String)>,
}

/// What this cluster exports: its exported services that have endpoints here.
/// A service without endpoints here is withdrawn, so peers stop sending it
/// traffic; services learned from peers are never in `local`.
pub fn export_set(local: &[LocalService]) -> BTreeMap<ServiceKey, Export> {
    local
        .iter()
        .filter(|s| s.exported && !s.endpoints.is_empty())
        .map(|s| {
            let mut export = s.export.clone();
            export.subsets = served_subsets(&s.subsets, &s.endpoints, &s.endpoint_info);
            (export.key.clone(), export)
        })
        .collect()
}

/// One cluster's view of a service while merging.
struct Participant<'a> {
    cluster: &'a ClusterName,
    export: &'a Export,
}

/// Merges this cluster's services with the peers' exports into a catalog.
/// Exports a peer claims for `cluster` itself (a sibling gateway of this
/// cluster) are left out: those endpoints are local.
pub fn merge(cluster: &ClusterName, local: &[LocalService], peers: &[&PeerCatalog]) -> Catalog {
    type Parts<'a> = (Option<&'a LocalService>, Vec<(&'a PeerCatalog, &'a Export)>);
    let mut by_key: BTreeMap<&ServiceKey, Parts<'_>> = BTreeMap::new();
    for service in local {
        by_key.entry(&service.export.key).or_default().0 = Some(service);
    }
    for peer in peers {
        if &peer.gateway.cluster == cluster {
            continue;
        }
        for (key, export) in &peer.services {
            by_key.entry(key).or_default().1.push((peer, export));
        }
    }

    let mut catalog = Catalog::default();
    for (key, (here, remote)) in by_key {
        let entry = merge_service(cluster, key, here, &remote, &mut catalog.conflicts);
        catalog.services.insert(key.clone(), Arc::new(entry));
    }
    catalog
}

/// The catalog `merge(cluster, local, peers)` would build, from `previous`
/// (what it built from the inputs before) and the keys whose inputs changed
/// since ([`changed_services`], [`changed_exports`], and every key of a peer
/// that came or went): only those services are merged again, every other
/// entry is `previous`'s own `Arc`, and so is a changed key's entry when it
/// comes out the same (consumers can tell what changed by pointer). `local`
/// is sorted by key, as the hub keeps it. One service's change costs about
/// one service's merge instead of the whole catalog's.
pub fn merge_changed(
    previous: &Catalog,
    cluster: &ClusterName,
    local: &[LocalService],
    peers: &[&PeerCatalog],
    changed: &BTreeSet<ServiceKey>,
) -> Catalog {
    debug_assert!(local.is_sorted_by(|a, b| a.export.key < b.export.key));
    let mut catalog = Catalog {
        services: previous.services.clone(),
        conflicts: previous
            .conflicts
            .iter()
            .filter(|c| !changed.contains(&c.service))
            .cloned()
            .collect(),
        gateways: HashMap::new(),
    };
    let others: Vec<&PeerCatalog> = peers
        .iter()
        .copied()
        .filter(|p| &p.gateway.cluster != cluster)
        .collect();
    let retained = catalog.conflicts.len();
    for key in changed {
        let here = local
            .binary_search_by(|s| s.export.key.cmp(key))
            .ok()
            .map(|i| &local[i]);
        let remote: Vec<(&PeerCatalog, &Export)> = others
            .iter()
            .filter_map(|p| p.services.get(key).map(|e| (*p, e)))
            .collect();
        if here.is_none() && remote.is_empty() {
            catalog.services.remove(key);
            continue;
        }
        let entry = merge_service(cluster, key, here, &remote, &mut catalog.conflicts);
        match previous.services.get(key) {
            Some(old) if **old == entry => {}
            _ => {
                catalog.services.insert(key.clone(), Arc::new(entry));
            }
        }
    }
    // In key order, as the full merge reports them (a stable sort keeps
    // each service's own order).
    if catalog.conflicts.len() > retained {
        catalog.conflicts.sort_by(|a, b| a.service.cmp(&b.service));
    }
    catalog
}

/// Adds to `into` the keys of this cluster's services that differ between
/// `before` and `after` (both sorted by key): new, gone or changed.
pub fn changed_services(
    before: &[LocalService],
    after: &[LocalService],
    into: &mut BTreeSet<ServiceKey>,
) {
    let before = before.iter().map(|s| (&s.export.key, s));
    let after = after.iter().map(|s| (&s.export.key, s));
    zip_by_key(before, after, |key, a, b| {
        if a != b {
            into.insert(key.clone());
        }
    });
}

/// Adds to `into` the keys whose part in the merge differs between two
/// versions of one peer's catalog: every key it exports when the gateway
/// itself changed (its lease, locality, labels, weight or address are in
/// every entry it serves), else the exports added, removed or changed.
pub fn changed_exports(before: &PeerCatalog, after: &PeerCatalog, into: &mut BTreeSet<ServiceKey>) {
    if before.gateway != after.gateway {
        into.extend(before.services.keys().cloned());
        into.extend(after.services.keys().cloned());
        return;
    }
    zip_by_key(&before.services, &after.services, |key, a, b| {
        if a != b {
            into.insert(key.clone());
        }
    });
}

/// Walks two sequences sorted by key in step, calling `each` once per key
/// with its value on either side (`None` where the key is absent).
pub(crate) fn zip_by_key<K: Ord, A, B>(
    before: impl IntoIterator<Item = (K, A)>,
    after: impl IntoIterator<Item = (K, B)>,
    mut each: impl FnMut(K, Option<A>, Option<B>),
) {
    let (mut a, mut b) = (before.into_iter().peekable(), after.into_iter().peekable());
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        match order {
            Ordering::Less => {
                if let Some((key, x)) = a.next() {
                    each(key, Some(x), None);
                }
            }
            Ordering::Greater => {
                if let Some((key, y)) = b.next() {
                    each(key, None, Some(y));
                }
            }
            Ordering::Equal => {
                if let (Some((key, x)), Some((_, y))) = (a.next(), b.next()) {
                    each(key, Some(x), Some(y));
                }
            }
        }
    }
}

/// One service's entry from its definition here (if any) and the peers
/// exporting it (none of this cluster); its conflicts go to `conflicts`.
fn merge_service(
    cluster: &ClusterName,
    key: &ServiceKey,
    here: Option<&LocalService>,
    remote: &[(&PeerCatalog, &Export)],
    conflicts: &mut Vec<Conflict>,
) -> ServiceEntry {
    let replicas = cluster_definitions(remote);
    let mut participants: Vec<Participant<'_>> = here
        .map(|s| Participant {
            cluster,
            export: &s.export,
        })
        .into_iter()
        .chain(replicas.iter().map(|(c, e)| Participant {
            cluster: c,
            export: e.as_ref(),
        }))
        .collect();
    // The local definition, when there is one, goes first whatever its
    // age: what this cluster serves is not a peer's to redefine.
    participants.sort_by(|a, b| {
        (a.cluster != cluster, a.export.export_time_millis, a.cluster).cmp(&(
            b.cluster != cluster,
            b.export.export_time_millis,
            b.cluster,
        ))
    });
    let (ports, headless) = merge_definition(key, &participants, here.is_some(), conflicts);
    let headless_endpoints = if headless {
        let mut all: Vec<HeadlessEndpoint> = participants
            .iter()
            .flat_map(|p| p.export.endpoints.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    } else {
        Vec::new()
    };
    let mut gateways: Vec<RemoteGateway> = remote
        .iter()
        .map(|(p, e)| RemoteGateway {
            subsets: e.subsets.clone(),
            ..p.gateway.clone()
        })
        .collect();
    gateways.sort_by(|a, b| (&a.cluster, &a.spiffe_id).cmp(&(&b.cluster, &b.spiffe_id)));
    ServiceEntry {
        key: key.clone(),
        ports,
        endpoints: here.map(|s| s.endpoints.clone()).unwrap_or_default(),
        endpoint_info: here.map(|s| s.endpoint_info.clone()).unwrap_or_default(),
        subsets: here.map(|s| s.subsets.clone()).unwrap_or_default(),
        remote: gateways,
        exported: here.is_some_and(|s| s.exported),
        allowed_callers: here.and_then(|s| s.allowed_callers.clone()),
        passthrough: here.is_some_and(|s| s.passthrough),
        headless,
        headless_endpoints,
    }
}

/// One definition per cluster from the exports of its gateways: a cluster
/// fronted by several replicas says one thing, not one thing per replica.
/// The cluster exported the service when its first replica did (the oldest
/// export time); its ports are the union of the replicas' (a port one
/// replica already serves, during a rolling change, is the cluster's);
/// where replicas disagree on a port or on headlessness, the replica with the
/// oldest export (then the lowest SPIFFE ID) decides, and nothing is reported:
/// replicas converge on their own, clusters do not. A cluster with one gateway
/// borrows its export as it is.
fn cluster_definitions<'a>(
    remote: &[(&'a PeerCatalog, &'a Export)],
) -> Vec<(&'a ClusterName, Cow<'a, Export>)> {
    let mut by_cluster: BTreeMap<&ClusterName, Vec<(&SpiffeId, &Export)>> = BTreeMap::new();
    for (peer, export) in remote {
        by_cluster
            .entry(&peer.gateway.cluster)
            .or_default()
            .push((&peer.gateway.spiffe_id, export));
    }
    by_cluster
        .into_iter()
        .map(|(cluster, mut replicas)| {
            if let [(_, only)] = replicas[..] {
                return (cluster, Cow::Borrowed(only));
            }
            replicas.sort_by_key(|(id, e)| (e.export_time_millis, *id));
            let mut joined = replicas[0].1.clone();
            for (_, other) in &replicas[1..] {
                for port in &other.ports {
                    if !joined.ports.iter().any(|p| p.port == port.port) {
                        joined.ports.push(port.clone());
                    }
                }
                if other.headless == joined.headless {
                    joined.endpoints.extend(other.endpoints.iter().cloned());
                }
            }
            joined.ports.sort_by_key(|p| p.port);
            joined.endpoints.sort();
            joined.endpoints.dedup();
            (cluster, Cow::Owned(joined))
        })
        .collect()
}

/// The union of the participants' ports and their headless flag, the first
/// participant winning each disagreement. `participants` is oldest first, or
/// with `local_first` the local definition first and alone defining the ports.
fn merge_definition(
    key: &ServiceKey,
    participants: &[Participant<'_>],
    local_first: bool,
    conflicts: &mut Vec<Conflict>,
) -> (Vec<ServicePort>, bool) {
    let mut ports: BTreeMap<u16, (ServicePort, &ClusterName)> = BTreeMap::new();
    let mut port_conflicts: BTreeMap<(u16, &str), Conflict> = BTreeMap::new();
    for (i, p) in participants.iter().enumerate() {
        for port in &p.export.ports {
            let Some((chosen, from)) = ports.get(&port.port) else {
                if local_first && i > 0 {
                    let local = participants[0].cluster;
                    port_conflicts
                        .entry((port.port, "port"))
                        .or_insert_with(|| Conflict {
                            service: key.clone(),
                            field: format!("port {}", port.port),
                            chosen: "(not a port of the local service)".into(),
                            chosen_from: local.clone(),
                            rejected: Vec::new(),
                        })
                        .rejected
                        .push((p.cluster.clone(), port.protocol.as_str().to_owned()));
                } else {
                    ports.insert(port.port, (port.clone(), p.cluster));
                }
                continue;
            };
            let mut disagree = |field: &'static str, chosen: String, theirs: String| {
                port_conflicts
                    .entry((port.port, field))
                    .or_insert_with(|| Conflict {
                        service: key.clone(),
                        field: format!("port {} {field}", port.port),
                        chosen,
                        chosen_from: (*from).clone(),
                        rejected: Vec::new(),
                    })
                    .rejected
                    .push((p.cluster.clone(), theirs));
            };
            if chosen.protocol != port.protocol {
                disagree(
                    "protocol",
                    chosen.protocol.as_str().to_owned(),
                    port.protocol.as_str().to_owned(),
                );
            }
            if chosen.name != port.name {
                let show = |n: &Option<crate::PortName>| {
                    n.as_ref()
                        .map_or_else(|| "(none)".to_owned(), ToString::to_string)
                };
                disagree("name", show(&chosen.name), show(&port.name));
            }
        }
    }
    conflicts.extend(port_conflicts.into_values());

    let headless = participants.first().is_some_and(|p| p.export.headless);
    let rejected: Vec<(ClusterName, String)> = participants
        .iter()
        .filter(|p| p.export.headless != headless)
        .map(|p| (p.cluster.clone(), p.export.headless.to_string()))
        .collect();
    if let (false, Some(oldest)) = (rejected.is_empty(), participants.first()) {
        conflicts.push(Conflict {
            service: key.clone(),
            field: "headless".into(),
            chosen: headless.to_string(),
            chosen_from: oldest.cluster.clone(),
            rejected,
        });
    }
    (ports.into_values().map(|(p, _)| p).collect(), headless)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Protocol;

    fn key(s: &str) -> ServiceKey {
        s.parse().unwrap()
    }

    fn port(n: u16, protocol: Protocol, name: Option<&str>) -> ServicePort {
        ServicePort {
            port: n,
            protocol,
            name: name.map(|n| n.parse().unwrap()),
        }
    }

    fn export(k: &str, time: u64, ports: Vec<ServicePort>) -> Export {
        Export {
            key: key(k),
            ports,
            export_time_millis: time,
            headless: false,
            endpoints: vec![],
            subsets: vec![],
        }
    }

    fn local(e: Export, endpoints: &[&str], exported: bool) -> LocalService {
        LocalService {
            export: e,
            endpoints: endpoints.iter().map(|a| a.parse().unwrap()).collect(),
            endpoint_info: BTreeMap::new(),
            subsets: vec![],
            exported,
            allowed_callers: None,
            passthrough: false,
        }
    }

    fn peer(cluster: &str, exports: Vec<Export>) -> PeerCatalog {
        PeerCatalog {
            gateway: RemoteGateway {
                cluster: cluster.parse().unwrap(),
                spiffe_id: format!("spiffe://{cluster}.example/isthmus/gateway/gw")
                    .parse()
                    .unwrap(),
                address: "127.0.0.1:15443".parse().unwrap(),
                locality: "r1".parse().unwrap(),
                labels: Default::default(),
                live: true,
                weight: 1,
                subsets: vec![],
            },
            services: exports.into_iter().map(|e| (e.key.clone(), e)).collect(),
        }
    }

    #[test]
    fn namespace_sameness_joins_local_and_remote() {
        let here: ClusterName = "a".parse().unwrap();
        let web = |t| export("shop/web", t, vec![port(80, Protocol::Http, None)]);
        let local = [local(web(5), &["10.0.0.1:80"], true)];
        let (b, c) = (peer("b", vec![web(1)]), peer("c", vec![web(9)]));
        let catalog = merge(&here, &local, &[&b, &c]);
        let entry = catalog.get(&key("shop/web")).unwrap();
        assert_eq!(entry.endpoints.len(), 1);
        let clusters: Vec<&str> = entry.remote.iter().map(|g| g.cluster.as_str()).collect();
        assert_eq!(clusters, ["b", "c"]);
        assert!(entry.exported);
        assert!(catalog.conflicts().is_empty());
        // A different namespace is a different service.
        let other = peer("b", vec![export("other/web", 1, vec![])]);
        let catalog = merge(&here, &local, &[&other]);
        assert_eq!(catalog.len(), 2);
        assert!(catalog.get(&key("shop/web")).unwrap().remote.is_empty());
    }

    #[test]
    fn ports_union_and_the_oldest_export_wins_a_conflict() {
        // A service not defined here: the peers' definitions merge.
        let here: ClusterName = "a".parse().unwrap();
        let c = peer(
            "c",
            vec![export(
                "shop/web",
                30,
                vec![
                    port(80, Protocol::Tcp, None),
                    port(90, Protocol::Http, None),
                ],
            )],
        );
        let b = peer(
            "b",
            vec![export(
                "shop/web",
                10,
                vec![
                    port(80, Protocol::Http, Some("web")),
                    port(81, Protocol::Grpc, None),
                ],
            )],
        );
        let catalog = merge(&here, &[], &[&c, &b]);
        let entry = catalog.get(&key("shop/web")).unwrap();
        assert_eq!(
            entry.ports,
            [
                port(80, Protocol::Http, Some("web")),
                port(81, Protocol::Grpc, None),
                port(90, Protocol::Http, None)
            ]
        );
        let fields: Vec<(&str, &str, &str)> = catalog
            .conflicts()
            .iter()
            .map(|c| (c.field.as_str(), c.chosen.as_str(), c.chosen_from.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("port 80 name", "web", "b"),
                ("port 80 protocol", "http", "b")
            ]
        );
        assert_eq!(catalog.conflicts()[1].rejected[0].1, "tcp");
    }

    #[test]
    fn a_peer_never_redefines_a_service_defined_here() {
        // The local definition is newer, yet it wins: ports, protocols and
        // headlessness; the peer's extra port and headless endpoints are
        // left out and every disagreement is reported.
        let here: ClusterName = "a".parse().unwrap();
        let local = [local(
            export(
                "shop/web",
                30,
                vec![
                    port(80, Protocol::Tcp, None),
                    port(90, Protocol::Http, None),
                ],
            ),
            &["10.0.0.1:80"],
            true,
        )];
        let mut rogue = export(
            "shop/web",
            1,
            vec![
                port(80, Protocol::Http, Some("web")),
                port(81, Protocol::Grpc, None),
            ],
        );
        rogue.headless = true;
        rogue.endpoints = vec![HeadlessEndpoint {
            cluster: "b".parse().unwrap(),
            hostname: None,
            address: "127.66.66.66".parse().unwrap(),
        }];
        let b = peer("b", vec![rogue]);
        let catalog = merge(&here, &local, &[&b]);
        let entry = catalog.get(&key("shop/web")).unwrap();
        assert_eq!(
            entry.ports,
            [
                port(80, Protocol::Tcp, None),
                port(90, Protocol::Http, None)
            ]
        );
        assert!(!entry.headless);
        assert!(entry.headless_endpoints.is_empty());
        assert_eq!(entry.remote.len(), 1, "b still serves it as a target");
        let fields: Vec<(&str, &str)> = catalog
            .conflicts()
            .iter()
            .map(|c| (c.field.as_str(), c.chosen_from.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("port 80 name", "a"),
                ("port 80 protocol", "a"),
                ("port 81", "a"),
                ("headless", "a")
            ]
        );
    }

    /// Gateway `name` of `cluster`, one of several replicas.
    fn replica(cluster: &str, name: &str, exports: Vec<Export>) -> PeerCatalog {
        let mut p = peer(cluster, exports);
        p.gateway.spiffe_id = format!("spiffe://{cluster}.example/isthmus/gateway/{name}")
            .parse()
            .unwrap();
        p
    }

    #[test]
    fn replicas_of_one_cluster_are_one_participant_and_never_conflict() {
        let here: ClusterName = "a".parse().unwrap();
        // Mid-rollout: b-2 already serves a new port 81 and names port 80;
        // b-1 was exported earlier (another state file) and does not yet.
        let b1 = replica(
            "b",
            "b-1",
            vec![export("shop/web", 5, vec![port(80, Protocol::Http, None)])],
        );
        let b2 = replica(
            "b",
            "b-2",
            vec![export(
                "shop/web",
                9,
                vec![
                    port(80, Protocol::Http, Some("web")),
                    port(81, Protocol::Grpc, None),
                ],
            )],
        );
        let catalog = merge(&here, &[], &[&b2, &b1]);
        assert!(
            catalog.conflicts().is_empty(),
            "replicas conflicted: {:?}",
            catalog.conflicts()
        );
        let entry = catalog.get(&key("shop/web")).unwrap();
        // The union of the replicas' ports; the oldest replica names port 80.
        assert_eq!(
            entry.ports,
            [
                port(80, Protocol::Http, None),
                port(81, Protocol::Grpc, None)
            ]
        );
        // Each replica is a target of its own.
        let ids: Vec<&str> = entry.remote.iter().map(|g| g.spiffe_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "spiffe://b.example/isthmus/gateway/b-1",
                "spiffe://b.example/isthmus/gateway/b-2"
            ]
        );

        // Another cluster still conflicts with the cluster, once, against
        // the cluster's oldest export time (b-1's 5, older than c's 7).
        let c = peer(
            "c",
            vec![export("shop/web", 7, vec![port(80, Protocol::Tcp, None)])],
        );
        let catalog = merge(&here, &[], &[&b2, &c, &b1]);
        let conflicts: Vec<(&str, &str, Vec<&str>)> = catalog
            .conflicts()
            .iter()
            .map(|c| {
                (
                    c.field.as_str(),
                    c.chosen_from.as_str(),
                    c.rejected.iter().map(|(r, _)| r.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(conflicts, [("port 80 protocol", "b", vec!["c"])]);
    }

    #[test]
    fn ties_break_by_cluster_name_and_headless_conflicts_are_reported() {
        let here: ClusterName = "z".parse().unwrap();
        let mut headless = export("db/pg", 7, vec![]);
        headless.headless = true;
        headless.endpoints = vec![HeadlessEndpoint {
            cluster: "b".parse().unwrap(),
            hostname: Some("pg-0".parse().unwrap()),
            address: "10.1.0.1".parse().unwrap(),
        }];
        let b = peer("b", vec![headless]);
        let c = peer("c", vec![export("db/pg", 7, vec![])]);
        let catalog = merge(&here, &[], &[&c, &b]);
        let entry = catalog.get(&key("db/pg")).unwrap();
        assert!(entry.headless, "b sorts before c at the same export time");
        assert_eq!(entry.headless_endpoints.len(), 1);
        assert_eq!(catalog.conflicts()[0].field, "headless");
        assert_eq!(catalog.conflicts()[0].rejected[0].0.as_str(), "c");
    }

    #[test]
    fn only_exported_services_with_endpoints_leave_and_own_cluster_is_skipped() {
        let here: ClusterName = "a".parse().unwrap();
        let local = [
            local(export("shop/web", 1, vec![]), &["10.0.0.1:80"], true),
            local(export("shop/private", 1, vec![]), &["10.0.0.2:80"], false),
            local(export("shop/empty", 1, vec![]), &[], true),
        ];
        let exports = export_set(&local);
        assert_eq!(exports.keys().collect::<Vec<_>>(), [&key("shop/web")]);
        // A sibling gateway of this cluster exporting the same service adds no
        // remote route: those endpoints are ours.
        let sibling = peer("a", vec![export("shop/web", 1, vec![])]);
        let catalog = merge(&here, &local, &[&sibling]);
        assert!(catalog.get(&key("shop/web")).unwrap().remote.is_empty());
    }

    /// A small deterministic generator (xorshift64*), so that a failing
    /// step can be replayed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    /// An export of `k` of random age, ports and headlessness: often in
    /// conflict with other clusters' definitions.
    fn random_export(rng: &mut Rng, k: &str) -> Export {
        let choices = [
            port(80, Protocol::Http, None),
            port(80, Protocol::Tcp, Some("web")),
            port(81, Protocol::Grpc, None),
            port(82, Protocol::Http, Some("admin")),
        ];
        let mut ports: Vec<ServicePort> = Vec::new();
        for p in choices {
            if rng.below(2) == 0 && !ports.iter().any(|q| q.port == p.port) {
                ports.push(p);
            }
        }
        let mut e = export(k, rng.below(4), ports);
        e.headless = rng.below(4) == 0;
        if e.headless {
            e.endpoints = vec![HeadlessEndpoint {
                cluster: "x".parse().unwrap(),
                hostname: None,
                address: format!("10.0.0.{}", rng.below(3)).parse().unwrap(),
            }];
        }
        if rng.below(3) == 0 {
            e.subsets = vec!["v2".into()];
        }
        e
    }

    /// Random changes to this cluster's services, to peers' exports and
    /// gateways, and peers coming and going: after each, merging only the
    /// changed keys gives the full merge's catalog (entries and conflicts,
    /// in order), and every unchanged key keeps its entry's `Arc`.
    #[test]
    fn merging_only_the_changed_keys_equals_the_full_merge() {
        let here: ClusterName = "a".parse().unwrap();
        let keys: Vec<String> = (0..10).map(|i| format!("ns-{}/svc-{i}", i % 3)).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut here_now: BTreeMap<ServiceKey, LocalService> = BTreeMap::new();
        // Two replicas of b, c, d, and a sibling gateway of this cluster.
        let gateways = [
            replica("b", "b-1", vec![]),
            replica("b", "b-2", vec![]),
            peer("c", vec![]),
            peer("d", vec![]),
            peer("a", vec![]),
        ];
        let mut peers: Vec<Option<PeerCatalog>> = gateways.iter().cloned().map(Some).collect();
        let refs = |peers: &[Option<PeerCatalog>]| -> Vec<PeerCatalog> {
            peers.iter().flatten().cloned().collect()
        };
        let locals = |local: &BTreeMap<ServiceKey, LocalService>| -> Vec<LocalService> {
            local.values().cloned().collect()
        };
        let mut previous = merge(&here, &[], &[]);
        let (mut merged_keys, mut with_conflicts) = (0, 0);
        for step in 0..2_000 {
            let (local_before, peers_before) = (locals(&here_now), peers.clone());
            for _ in 0..=rng.below(3) {
                let k = keys[usize::try_from(rng.below(10)).unwrap()].as_str();
                let i = usize::try_from(rng.below(5)).unwrap();
                match rng.below(8) {
                    0 => {
                        here_now.remove(&key(k));
                    }
                    1 | 2 => {
                        let e = random_export(&mut rng, k);
                        let endpoints: &[&str] = if rng.below(4) == 0 {
                            &[]
                        } else {
                            &["10.1.0.1:80"]
                        };
                        here_now.insert(key(k), local(e, endpoints, rng.below(4) != 0));
                    }
                    3 | 4 => {
                        let e = random_export(&mut rng, k);
                        if let Some(p) = &mut peers[i] {
                            p.services.insert(key(k), e);
                        }
                    }
                    5 => {
                        if let Some(p) = &mut peers[i] {
                            p.services.remove(&key(k));
                        }
                    }
                    6 => {
                        if let Some(p) = &mut peers[i] {
                            p.gateway.live = !p.gateway.live;
                            p.gateway.weight = 1 + u32::try_from(rng.below(3)).unwrap();
                        }
                    }
                    _ => {
                        peers[i] = match peers[i].take() {
                            Some(_) => None,
                            None => Some(gateways[i].clone()),
                        };
                    }
                }
            }
            let mut changed = BTreeSet::new();
            changed_services(&local_before, &locals(&here_now), &mut changed);
            for (before, after) in peers_before.iter().zip(&peers) {
                match (before, after) {
                    (Some(b), Some(a)) => changed_exports(b, a, &mut changed),
                    (Some(p), None) | (None, Some(p)) => changed.extend(p.services.keys().cloned()),
                    (None, None) => {}
                }
            }
            merged_keys += changed.len();
            let (local_now, peers_now) = (locals(&here_now), refs(&peers));
            let peer_refs: Vec<&PeerCatalog> = peers_now.iter().collect();
            let full = merge(&here, &local_now, &peer_refs);
            let incremental = merge_changed(&previous, &here, &local_now, &peer_refs, &changed);
            assert_eq!(incremental, full, "step {step}, changed {changed:?}");
            for (k, entry) in &incremental.services {
                if !changed.contains(k) {
                    assert!(
                        Arc::ptr_eq(entry, &previous.services[k]),
                        "step {step}: {k} copied"
                    );
                }
            }
            with_conflicts += usize::from(!incremental.conflicts().is_empty());
            previous = incremental;
        }
        // Neither every key merged again each time, nor no conflicts to order.
        assert!(
            merged_keys < 2_000 * keys.len() / 2,
            "{merged_keys} keys merged"
        );
        assert!(
            with_conflicts > 500,
            "conflicts in only {with_conflicts} steps"
        );
    }
}
