//! This cluster's export times across restarts.

use super::*;

#[test]
fn own_export_times_survive_a_restart_through_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let local = local("shop/web", ([127, 0, 0, 20], 8080).into(), 0);
    let start = |path: &std::path::Path| {
        let hub = hub(PeeringLimits::default(), Some(path.to_owned()));
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

/// The catalog names the cluster of every peer gateway, configured or
/// admitted, also one without an east-west listener (it may still call this
/// gateway's); any other caller has none.
#[test]
fn the_catalog_names_each_peer_gateways_cluster() {
    let a = hello("a", 1);
    let outbound_only = PeerHello {
        east_west: None,
        ..hello("b", 1)
    };
    let hub = hub_with(&[&a, &outbound_only], &[], PeeringLimits::default());
    let _sessions = [
        hub.session_open(&a).unwrap(),
        hub.session_open(&outbound_only).unwrap(),
    ];
    let configured = hello("c", 1);
    hub.set_static_peers(vec![PeerCatalog {
        gateway: record::gateway_of(&configured),
        services: BTreeMap::new(),
    }]);
    let catalog = hub.catalog().load();
    let cluster = |id: &SpiffeId| catalog.gateway_cluster(id).map(|c| c.as_str().to_owned());
    assert_eq!(cluster(&a.spiffe_id).as_deref(), Some("a"));
    assert_eq!(cluster(&outbound_only.spiffe_id).as_deref(), Some("b"));
    assert_eq!(cluster(&configured.spiffe_id).as_deref(), Some("c"));
    let stranger = "spiffe://a.example/isthmus/gateway/other".parse().unwrap();
    assert_eq!(cluster(&stranger), None);
}

/// Each change merges again only what it touched: after a peer's delta, a
/// lapsed lease and a change here, the catalog is what a full merge of the
/// hub's inputs gives, and every service the change did not touch keeps its
/// entry (the same `Arc`, so consumers can skip it).
#[test]
fn a_change_merges_only_its_services_and_equals_the_full_merge() {
    let west = hello("west", 1);
    let east = PeerHello {
        east_west: Some(([127, 0, 0, 10], 15443).into()),
        ..hello("east", 1)
    };
    let hub = hub_with(&[&west, &east], &["*/*"], PeeringLimits::default());
    let sessions = [
        hub.session_open(&west).unwrap(),
        hub.session_open(&east).unwrap(),
    ];
    let ep = ([127, 0, 0, 20], 8080).into();
    hub.set_source(
        "config",
        vec![local("shop/web", ep, 1), local("shop/db", ep, 1)],
    );
    hub.apply_snapshot(&west, 1, vec![export("shop/web"), export("west/a")]);
    hub.apply_snapshot(&east, 1, vec![export("east/a"), export("east/b")]);
    hub.recompute();
    let full = |hub: &Hub| {
        let inner = hub.inner();
        let peers: Vec<&PeerCatalog> = inner.peers.values().map(|r| r.catalog.as_ref()).collect();
        crate::catalog::merge(&hub.me.cluster, &inner.local, &peers)
    };
    let same = |a: &Catalog, b: &Catalog, key: &str| {
        let key = key.parse::<ServiceKey>().unwrap();
        Arc::ptr_eq(a.get(&key).unwrap(), b.get(&key).unwrap())
    };
    let before = hub.catalog().load_full();

    // A delta of west's: west/b is new, west/a changed; east's are kept.
    let mut changed = export("west/a");
    changed.ports[0].port = 81;
    hub.apply_delta(&west, 1, 2, vec![changed, export("west/b")], vec![]);
    hub.recompute();
    let after = hub.catalog().load_full();
    assert_eq!(*after, full(&hub).with_gateways(gateways(&hub)));
    assert_eq!(
        after.get(&"west/a".parse().unwrap()).unwrap().ports[0].port,
        81
    );
    assert!(after.get(&"west/b".parse().unwrap()).is_some());
    for untouched in ["east/a", "east/b", "shop/web", "shop/db"] {
        assert!(same(&before, &after, untouched), "{untouched} merged again");
    }

    // East's session ends: its services stay (lapsed, not live), merged
    // again; west's stay as they were.
    drop(sessions);
    let before = after;
    hub.check_leases(Instant::now() + Duration::from_secs(1));
    hub.recompute();
    let after = hub.catalog().load_full();
    assert_eq!(*after, full(&hub).with_gateways(gateways(&hub)));
    assert!(!after.get(&"east/a".parse().unwrap()).unwrap().remote[0].live);
    assert!(same(&before, &after, "shop/db"));

    // A change here: shop/db leaves, the rest stays.
    hub.set_source("config", vec![local("shop/web", ep, 1)]);
    let last = hub.catalog().load_full();
    assert!(last.get(&"shop/db".parse().unwrap()).is_none());
    assert!(same(&after, &last, "west/b"));
    assert_eq!(*last, full(&hub).with_gateways(gateways(&hub)));
}

/// The peer gateways `hub` knows, as `with_gateways` takes them.
fn gateways(hub: &Hub) -> Vec<(SpiffeId, crate::ClusterName)> {
    hub.inner()
        .peers
        .values()
        .map(|r| {
            (
                r.catalog.gateway.spiffe_id.clone(),
                r.catalog.gateway.cluster.clone(),
            )
        })
        .collect()
}
