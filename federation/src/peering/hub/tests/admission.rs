//! Hellos: grants, clusters, localities, addresses and the session cap.

use super::*;

#[test]
fn a_hello_outside_its_grant_is_refused() {
    let west = hello("west", 1);
    let hub = hub_with(&[&west], &[], PeeringLimits::default());

    // Not granted at all.
    let stranger = hello("east", 1);
    assert_eq!(refusal(&hub, &stranger), HelloRefusal::NotGranted);

    // Granted, but claiming another cluster.
    let mut spoof = west.clone();
    spoof.cluster = "east".parse().unwrap();
    let err = hub.session_open(&spoof).unwrap_err();
    assert_eq!(err.reason, HelloRefusal::Cluster);
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
    assert_eq!(refusal(&hub, &spoof), HelloRefusal::Locality);
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
    let local = local("shop/db", endpoint, 0);
    hub.set_source("config", vec![local]);
    let _west = hub.session_open(&west).unwrap();

    // North announces west's address, then a local endpoint's.
    north.east_west = west.east_west;
    let err = hub.session_open(&north).unwrap_err();
    assert_eq!(err.reason, HelloRefusal::Address);
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
    assert_eq!(refusal(&hub, &west), HelloRefusal::Sessions);
    drop(_a);
    let _c = hub.session_open(&west).unwrap();
}
