use serde_json::{Value, json};

use super::*;
use crate::catalog::RemoteGateway;
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

/// A hub for `me` that grants each of `peers` its own cluster (named as
/// the peer) and `imports`.
fn hub_with(peers: &[&PeerHello], imports: &[&str], limits: PeeringLimits) -> Arc<Hub> {
    let metrics = PeeringMetrics::new(&prometheus::Registry::new()).unwrap();
    let hub = Hub::new(
        me(),
        Duration::from_secs(30),
        Arc::new(ArcSwap::default()),
        None,
        limits,
        None,
        metrics,
    );
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
    hub
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

#[test]
fn a_peer_is_live_while_a_session_is_open_and_its_lease_renewed() {
    let peer = hello("west", 7);
    let hub = hub_with(&[&peer], &[], PeeringLimits::default());
    let session = hub.session_open(&peer).unwrap();
    assert!(
        hub.apply_snapshot(&peer, 1, vec![export("shop/web")])
            .is_empty()
    );
    hub.recompute();
    assert_eq!(live(&hub), Some(true));
    let catalog = hub.catalog().load();
    let gw = &catalog.get(&"shop/web".parse().unwrap()).unwrap().remote[0];
    assert_eq!(gw.subsets, ["v2"], "the peer's announced subsets");

    // The stream closes: not live at once, though its services stay.
    drop(session);
    hub.recompute();
    assert_eq!(live(&hub), Some(false));

    // Back, then silent past its lease: lapsed, not live; services kept
    // for the grace period.
    let session = hub.session_open(&peer).unwrap();
    hub.recompute();
    assert_eq!(live(&hub), Some(true));
    hub.check_leases(Instant::now() + Duration::from_secs(1));
    assert_eq!(live(&hub), Some(false));
    hub.heard(&peer.spiffe_id);
    hub.recompute();
    assert_eq!(live(&hub), Some(true));
    drop(session);
}

#[test]
fn a_hello_outside_its_grant_is_refused() {
    let west = hello("west", 1);
    let hub = hub_with(&[&west], &[], PeeringLimits::default());

    // Not granted at all.
    let stranger = hello("east", 1);
    assert_eq!(
        hub.session_open(&stranger).unwrap_err().reason,
        "not_granted"
    );

    // Granted, but claiming another cluster.
    let mut spoof = west.clone();
    spoof.cluster = "east".parse().unwrap();
    let err = hub.session_open(&spoof).unwrap_err();
    assert_eq!(err.reason, "cluster");
    assert!(err.message.contains("west"), "{}", err.message);
    assert_eq!(refused(&hub, "cluster"), 1);
    assert!(hub.debug_peers().peers.is_empty());

    // Its own cluster: admitted.
    let _ok = hub.session_open(&west).unwrap();
}

#[test]
fn a_hello_outside_its_granted_localities_is_refused() {
    let west = hello("west", 1);
    let hub = hub_with(&[&west], &[], PeeringLimits::default());
    hub.set_authority(PeerAuthority {
        peers: [(
            west.spiffe_id.clone(),
            Grant {
                clusters: [west.cluster.clone()].into(),
                localities: vec!["eu-west".parse().unwrap()],
                ..Grant::default()
            },
        )]
        .into(),
        ..PeerAuthority::default()
    });
    // Claims this gateway's zone to draw its traffic.
    let mut spoof = west.clone();
    spoof.locality = "us-east/us-east-1a".parse().unwrap();
    assert_eq!(hub.session_open(&spoof).unwrap_err().reason, "locality");
    let mut honest = west.clone();
    honest.locality = "eu-west/eu-west-1b".parse().unwrap();
    let _ok = hub.session_open(&honest).unwrap();
}

#[test]
fn a_peer_may_not_announce_an_address_that_is_not_its_own() {
    let (west, mut north) = (hello("west", 1), hello("north", 1));
    north.east_west = Some(([127, 0, 0, 10], 15443).into());
    let hub = hub_with(&[&west, &north], &[], PeeringLimits::default());
    let endpoint: std::net::SocketAddr = ([127, 0, 0, 20], 8080).into();
    let mut local = LocalService {
        export: export("shop/db"),
        endpoints: vec![endpoint],
        endpoint_info: BTreeMap::new(),
        subsets: vec![],
        exported: true,
        allowed_callers: None,
        passthrough: false,
    };
    local.export.export_time_millis = 0;
    hub.set_source("config", vec![local]);
    let _west = hub.session_open(&west).unwrap();

    // North announces west's address, then a local endpoint's.
    north.east_west = west.east_west;
    let err = hub.session_open(&north).unwrap_err();
    assert_eq!(err.reason, "address");
    assert!(
        err.message.contains("peer spiffe://west"),
        "{}",
        err.message
    );
    north.east_west = Some(endpoint);
    let err = hub.session_open(&north).unwrap_err();
    assert!(err.message.contains("shop/db"), "{}", err.message);
    assert_eq!(refused(&hub, "address"), 2);
}

#[test]
fn sessions_per_peer_are_capped() {
    let west = hello("west", 1);
    let limits = PeeringLimits {
        max_sessions_per_peer: 2,
        ..PeeringLimits::default()
    };
    let hub = hub_with(&[&west], &[], limits);
    let (_a, _b) = (
        hub.session_open(&west).unwrap(),
        hub.session_open(&west).unwrap(),
    );
    assert_eq!(hub.session_open(&west).unwrap_err().reason, "sessions");
    drop(_a);
    let _c = hub.session_open(&west).unwrap();
}

#[test]
fn exports_outside_the_imports_or_over_the_cap_are_refused() {
    let west = hello("west", 1);
    let limits = PeeringLimits {
        max_services_per_peer: 2,
        ..PeeringLimits::default()
    };
    let hub = hub_with(&[&west], &["shop/*"], limits);
    let _s = hub.session_open(&west).unwrap();
    let refused_now = hub.apply_snapshot(
        &west,
        1,
        vec![
            export("shop/web"),
            export("kube-system/dns"),
            export("shop/cart"),
        ],
    );
    let reasons: Vec<(&str, &str)> = refused_now
        .iter()
        .map(|r| (r.service.as_str(), r.reason))
        .collect();
    assert_eq!(reasons, [("kube-system/dns", "import")]);
    hub.recompute();
    assert!(
        hub.catalog()
            .load()
            .get(&"kube-system/dns".parse().unwrap())
            .is_none()
    );

    // At the cap: an update of a held service fits, a new one does not.
    let (outcome, refused_now) = hub.apply_delta(
        &west,
        1,
        2,
        vec![export("shop/web"), export("shop/new")],
        vec![],
    );
    assert_eq!(outcome, DeltaOutcome::Applied);
    assert_eq!(refused_now.len(), 1);
    assert_eq!(
        (refused_now[0].service.as_str(), refused_now[0].reason),
        ("shop/new", "services_cap")
    );
    assert_eq!(refused(&hub, "services_cap"), 1);
    assert_eq!(refused(&hub, "import"), 1);
    let peers = hub.debug_peers();
    assert_eq!(peers.peers[0].refused_exports_total, 2);
    assert!(
        peers.peers[0].refused_exports.contains_key("shop/new"),
        "{peers:?}"
    );
}

#[test]
fn peer_export_times_are_clamped_to_first_sight_and_now() {
    let west = hello("west", 1);
    let hub = hub_with(&[&west], &[], PeeringLimits::default());
    let _s = hub.session_open(&west).unwrap();
    let before = unix_millis(SystemTime::now());
    let mut old = export("shop/web");
    old.export_time_millis = 1; // "exported in 1970": would win every conflict
    let mut future = export("shop/cart");
    future.export_time_millis = u64::MAX;
    hub.apply_snapshot(&west, 1, vec![old, future]);
    let inner = hub.inner();
    let services = &inner.peers[&west.spiffe_id].catalog.services;
    let after = unix_millis(SystemTime::now());
    for key in ["shop/web", "shop/cart"] {
        let t = services[&key.parse::<ServiceKey>().unwrap()].export_time_millis;
        assert!(
            (before..=after).contains(&t),
            "{key}: {t} not in {before}..={after}"
        );
    }
}

#[test]
fn expired_peers_are_forgotten_after_the_retention_time() {
    let west = hello("west", 1);
    let limits = PeeringLimits {
        peer_retention: Duration::from_secs(60),
        ..PeeringLimits::default()
    };
    let hub = hub_with(&[&west], &[], limits);
    drop(hub.session_open(&west).unwrap());
    let t0 = Instant::now();
    hub.check_leases(t0 + Duration::from_secs(1)); // lapsed
    hub.check_leases(t0 + Duration::from_secs(40)); // expired (grace 30 s)
    assert_eq!(hub.debug_peers().peers[0].state, LeaseState::Expired);
    let up = |hub: &Hub| {
        hub.metrics()
            .peer_up
            .get_metric_with_label_values(&[west.spiffe_id.as_str(), "west"])
            .is_ok()
    };
    let families = |hub: &Hub| {
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(hub.metrics().peer_up.clone()))
            .unwrap();
        registry
            .gather()
            .iter()
            .map(|f| f.get_metric().len())
            .sum::<usize>()
    };
    assert!(up(&hub));
    assert_eq!(families(&hub), 1);
    hub.check_leases(t0 + Duration::from_secs(120));
    assert!(hub.debug_peers().peers.is_empty());
    assert_eq!(families(&hub), 0, "its metric series are gone");
}

#[test]
fn own_export_times_survive_a_restart_through_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let mut local = LocalService {
        export: export("shop/web"),
        endpoints: vec![([127, 0, 0, 20], 8080).into()],
        endpoint_info: BTreeMap::new(),
        subsets: vec![],
        exported: true,
        allowed_callers: None,
        passthrough: false,
    };
    local.export.export_time_millis = 0;
    let start = |path: &std::path::Path| {
        let metrics = PeeringMetrics::new(&prometheus::Registry::new()).unwrap();
        let hub = Hub::new(
            me(),
            Duration::from_secs(30),
            Arc::new(ArcSwap::default()),
            None,
            PeeringLimits::default(),
            Some(path.to_owned()),
            metrics,
        );
        hub.set_source("config", vec![local.clone()]);
        hub.exports().borrow().services[&"shop/web".parse::<ServiceKey>().unwrap()]
            .export_time_millis
    };
    let first = start(&path);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(
        start(&path),
        first,
        "the restarted gateway keeps its export time"
    );
}

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

    let mut web = LocalService {
        export: export("shop/web"),
        endpoints: vec![([127, 0, 0, 20], 8080).into()],
        endpoint_info: BTreeMap::new(),
        subsets: vec![],
        exported: true,
        allowed_callers: None,
        passthrough: false,
    };
    web.export.export_time_millis = 1_600_000_000_000;
    let mut db = LocalService {
        export: export("shop/db"),
        endpoints: vec![([127, 0, 0, 21], 5432).into()],
        endpoint_info: BTreeMap::new(),
        subsets: vec![],
        exported: false,
        allowed_callers: None,
        passthrough: false,
    };
    db.export.export_time_millis = 1_600_000_000_000;
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
                  "locality": "r"
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
                  "locality": "r"
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
                  "locality": "eu/eu-1a"
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
                  "locality": "r"
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
