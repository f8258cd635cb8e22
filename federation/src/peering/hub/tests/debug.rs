//! The debug views' JSON, pinned.

use serde_json::{Value, json};

use super::*;
use crate::catalog::RemoteGateway;

/// A hub with peers in every state `/debug/peers` shows: live and synced
/// (with ACKs, NACKs both ways and refused exports), lapsed, expired,
/// admitted through `federation.accept` (not configured), configured but
/// never connected; with local exports, a static peer, a conflict and a
/// headless service for `/debug/catalog`. Times that depend on the clock
/// are pinned (last sync) or checked and then pinned (last heard).
fn hub_in_several_states() -> (Arc<Hub>, Vec<SessionGuard>) {
    let mut west = hello("west", 7);
    west.lease = Duration::from_secs(3600);
    let mut north = hello("north", 8);
    north.east_west = None;
    north.lease = Duration::from_secs(20);
    let mut south = hello("south", 9);
    south.east_west = Some(([127, 0, 0, 11], 15443).into());
    let never = hello("east", 1);
    let mut accepted = hello("acc", 3);
    accepted.east_west = Some(([127, 0, 0, 12], 15443).into());
    accepted.lease = Duration::from_secs(3600);
    let hub = hub_with(
        &[&west, &north, &south, &never],
        &["shop/*"],
        PeeringLimits {
            max_services_per_peer: 3,
            ..PeeringLimits::default()
        },
    );
    let mut authority = (*hub.authority()).clone();
    authority.gateways_of.insert(
        accepted.spiffe_id.trust_domain(),
        Grant {
            clusters: [accepted.cluster.clone()].into(),
            localities: vec![],
            imports: ServicePatterns::new(vec!["shop/*".to_owned()]),
            exports: None,
        },
    );
    hub.set_authority(authority);

    let web = local(
        "shop/web",
        ([127, 0, 0, 20], 8080).into(),
        1_600_000_000_000,
    );
    let db = LocalService {
        exported: false,
        ..local("shop/db", ([127, 0, 0, 21], 5432).into(), 1_600_000_000_000)
    };
    hub.set_source("config", vec![web, db]);
    hub.set_static_peers(vec![PeerCatalog {
        gateway: RemoteGateway {
            cluster: "legacy".parse().unwrap(),
            spiffe_id: "spiffe://legacy.example/isthmus/gateway/gw"
                .parse()
                .unwrap(),
            address: ([127, 0, 0, 30], 15443).into(),
            locality: "eu/eu-1a".parse().unwrap(),
            labels: Default::default(),
            live: true,
            weight: 1,
            subsets: Vec::new(),
        },
        services: [("shop/legacy".parse().unwrap(), export("shop/legacy"))].into(),
    }]);

    let mut sessions = Vec::new();
    sessions.push(hub.session_open(&west).unwrap());
    let mut tcp = export("shop/web");
    tcp.ports[0].protocol = crate::catalog::Protocol::Tcp;
    let mut headless = export("shop/cache");
    headless.headless = true;
    headless.endpoints = vec![crate::catalog::HeadlessEndpoint {
        cluster: "west".parse().unwrap(),
        hostname: Some("cache-0".parse().unwrap()),
        address: [10, 1, 0, 5].into(),
    }];
    let refused = hub.apply_snapshot(
        &west,
        4,
        vec![
            tcp,
            headless,
            export("kube-system/dns"),
            export("shop/cart"),
        ],
    );
    assert_eq!(refused.len(), 1);
    hub.acked(&west.spiffe_id, 3);
    hub.nacked(&west.spiffe_id, true, "kube-system/dns: not imported");
    hub.nacked(&west.spiffe_id, false, "shop/x: bad port");

    drop(hub.session_open(&north).unwrap());
    hub.apply_snapshot(&north, 1, vec![export("shop/north")]);
    drop(hub.session_open(&south).unwrap());
    hub.apply_snapshot(&south, 2, vec![export("shop/south")]);
    sessions.push(hub.session_open(&accepted).unwrap());

    // North's 20 s lease lapses at 21 s; south's (500 ms) at 21 s too,
    // and expires at 40 s (grace 30 s), when north is still lapsed.
    let t0 = Instant::now();
    for id in [&west, &accepted].map(|p| &p.spiffe_id) {
        hub.inner().peers.get_mut(id).unwrap().last_heard = t0 + Duration::from_secs(40);
    }
    hub.check_leases(t0 + Duration::from_secs(21));
    hub.check_leases(t0 + Duration::from_secs(40));
    for (i, record) in hub.inner().peers.values_mut().enumerate() {
        record.last_heard = Instant::now() - Duration::from_secs(5);
        record.last_sync = record
            .last_sync
            .map(|_| SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123 + i as u64));
    }
    hub.recompute();
    (hub, sessions)
}

/// `last_heard_ms_ago` of every peer: about 5 s, then pinned to 5000.
fn pin_last_heard(mut peers: Value) -> Value {
    for peer in peers["peers"].as_array_mut().unwrap() {
        let ago = peer["last_heard_ms_ago"].as_u64().unwrap();
        assert!((5000..6000).contains(&ago), "{ago}");
        peer["last_heard_ms_ago"] = json!(5000);
    }
    peers
}

/// `/debug/peers` as operators and the e2e tests read it: field names,
/// nesting, value formats and field order (compared as text).
#[test]
fn debug_peers_keeps_its_shape() {
    let (hub, _sessions) = hub_in_several_states();
    let peers = pin_last_heard(serde_json::to_value(hub.debug_peers()).unwrap());
    let expected = json!(
        {
          "gateway": "spiffe://me.example/isthmus/gateway/gw",
          "cluster": "me",
          "incarnation": 1,
          "export_version": 3,
          "exported": [
            "shop/web"
          ],
          "peers": [
            {
              "spiffe_id": "spiffe://acc.example/isthmus/gateway/gw",
              "cluster": "acc",
              "locality": "r",
              "east_west": "127.0.0.12:15443",
              "configured": false,
              "state": "live",
              "live": true,
              "sessions": 1,
              "incarnation": 3,
              "lease_ms": 3600000,
              "weight": 1,
              "last_heard_ms_ago": 5000,
              "synced": false,
              "version": 0,
              "acked_by_peer": 0,
              "last_sync": null,
              "services": [],
              "nacks_sent": 0,
              "nacks_received": 0,
              "last_nack": null,
              "refused_exports_total": 0,
              "refused_exports": {}
            },
            {
              "spiffe_id": "spiffe://north.example/isthmus/gateway/gw",
              "cluster": "north",
              "locality": "r",
              "east_west": null,
              "configured": true,
              "state": "lapsed",
              "live": false,
              "sessions": 0,
              "incarnation": 8,
              "lease_ms": 20000,
              "weight": 1,
              "last_heard_ms_ago": 5000,
              "synced": true,
              "version": 1,
              "acked_by_peer": 0,
              "last_sync": "2023-11-14T22:13:20.124Z",
              "services": [
                "shop/north"
              ],
              "nacks_sent": 0,
              "nacks_received": 0,
              "last_nack": null,
              "refused_exports_total": 0,
              "refused_exports": {}
            },
            {
              "spiffe_id": "spiffe://south.example/isthmus/gateway/gw",
              "cluster": "south",
              "locality": "r",
              "east_west": "127.0.0.11:15443",
              "configured": true,
              "state": "expired",
              "live": false,
              "sessions": 0,
              "incarnation": 9,
              "lease_ms": 500,
              "weight": 1,
              "last_heard_ms_ago": 5000,
              "synced": false,
              "version": 2,
              "acked_by_peer": 0,
              "last_sync": "2023-11-14T22:13:20.125Z",
              "services": [],
              "nacks_sent": 0,
              "nacks_received": 0,
              "last_nack": null,
              "refused_exports_total": 0,
              "refused_exports": {}
            },
            {
              "spiffe_id": "spiffe://west.example/isthmus/gateway/gw",
              "cluster": "west",
              "locality": "r",
              "east_west": "127.0.0.9:15443",
              "configured": true,
              "state": "live",
              "live": true,
              "sessions": 1,
              "incarnation": 7,
              "lease_ms": 3600000,
              "weight": 1,
              "last_heard_ms_ago": 5000,
              "synced": true,
              "version": 4,
              "acked_by_peer": 3,
              "last_sync": "2023-11-14T22:13:20.126Z",
              "services": [
                "shop/cache",
                "shop/cart",
                "shop/web"
              ],
              "nacks_sent": 1,
              "nacks_received": 1,
              "last_nack": "received: shop/x: bad port",
              "refused_exports_total": 1,
              "refused_exports": {
                "kube-system/dns": "not among the services this gateway imports from this peer"
              }
            }
          ],
          "never_connected": [
            "spiffe://east.example/isthmus/gateway/gw"
          ]
        }
    );
    assert_eq!(
        serde_json::to_string_pretty(&peers).unwrap(),
        serde_json::to_string_pretty(&expected).unwrap()
    );
}

/// `/debug/catalog` (before the gateway adds clusterset IPs), likewise.
#[test]
fn debug_catalog_keeps_its_shape() {
    let (hub, _sessions) = hub_in_several_states();
    let catalog = hub.debug_catalog();
    assert_eq!(catalog, serde_json::to_value(hub.catalog_view()).unwrap());
    let expected = json!(
        {
          "cluster": "me",
          "services": [
            {
              "service": "shop/cache",
              "ports": [
                {
                  "port": 80,
                  "protocol": "http"
                }
              ],
              "exported": false,
              "headless": true,
              "local_endpoints": [],
              "remote": [
                {
                  "cluster": "west",
                  "gateway": "spiffe://west.example/isthmus/gateway/gw",
                  "address": "127.0.0.9:15443",
                  "locality": "r",
                  "weight": 1
                }
              ],
              "headless_endpoints": [
                {
                  "cluster": "west",
                  "hostname": "cache-0",
                  "address": "10.1.0.5"
                }
              ]
            },
            {
              "service": "shop/cart",
              "ports": [
                {
                  "port": 80,
                  "protocol": "http"
                }
              ],
              "exported": false,
              "headless": false,
              "local_endpoints": [],
              "remote": [
                {
                  "cluster": "west",
                  "gateway": "spiffe://west.example/isthmus/gateway/gw",
                  "address": "127.0.0.9:15443",
                  "locality": "r",
                  "weight": 1
                }
              ],
              "headless_endpoints": []
            },
            {
              "service": "shop/db",
              "ports": [
                {
                  "port": 80,
                  "protocol": "http"
                }
              ],
              "exported": false,
              "headless": false,
              "local_endpoints": [
                "127.0.0.21:5432"
              ],
              "remote": [],
              "headless_endpoints": []
            },
            {
              "service": "shop/legacy",
              "ports": [
                {
                  "port": 80,
                  "protocol": "http"
                }
              ],
              "exported": false,
              "headless": false,
              "local_endpoints": [],
              "remote": [
                {
                  "cluster": "legacy",
                  "gateway": "spiffe://legacy.example/isthmus/gateway/gw",
                  "address": "127.0.0.30:15443",
                  "locality": "eu/eu-1a",
                  "weight": 1
                }
              ],
              "headless_endpoints": []
            },
            {
              "service": "shop/web",
              "ports": [
                {
                  "port": 80,
                  "protocol": "http"
                }
              ],
              "exported": true,
              "headless": false,
              "local_endpoints": [
                "127.0.0.20:8080"
              ],
              "remote": [
                {
                  "cluster": "west",
                  "gateway": "spiffe://west.example/isthmus/gateway/gw",
                  "address": "127.0.0.9:15443",
                  "locality": "r",
                  "weight": 1
                }
              ],
              "headless_endpoints": []
            }
          ],
          "conflicts": [
            {
              "service": {
                "namespace": "shop",
                "name": "web"
              },
              "field": "port 80 protocol",
              "chosen": "http",
              "chosen_from": "me",
              "rejected": [
                [
                  "west",
                  "tcp"
                ]
              ]
            }
          ]
        }
    );
    assert_eq!(
        serde_json::to_string_pretty(&catalog).unwrap(),
        serde_json::to_string_pretty(&expected).unwrap()
    );
}
