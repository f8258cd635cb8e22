//! Peers' exports: refusals, caps and export times.

use super::*;

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
        .map(|r| (r.service.as_str(), r.reason.label()))
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
        (
            refused_now[0].service.as_str(),
            refused_now[0].reason.label()
        ),
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
