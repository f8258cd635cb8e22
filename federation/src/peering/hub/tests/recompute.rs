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
