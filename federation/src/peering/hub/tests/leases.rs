//! Liveness, leases and forgetting expired peers.

use super::*;

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
    let syncs = [&hub.metrics().syncs, &hub.metrics().sync_bytes];
    for (counter, kind) in syncs.iter().zip(["snapshot", "resume"]) {
        counter
            .with_label_values(&[west.spiffe_id.as_str(), kind, "sent"])
            .inc();
    }
    let sync_series = |hub: &Hub| {
        use prometheus::core::Collector;
        let m = hub.metrics();
        m.syncs.collect()[0].get_metric().len() + m.sync_bytes.collect()[0].get_metric().len()
    };
    assert_eq!(sync_series(&hub), 2);
    hub.check_leases(t0 + Duration::from_secs(120));
    assert!(hub.debug_peers().peers.is_empty());
    assert_eq!(families(&hub), 0, "its metric series are gone");
    assert_eq!(sync_series(&hub), 0);
}
