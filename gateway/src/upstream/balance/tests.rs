use std::collections::BTreeMap;

use isthmus_federation::catalog::{EndpointInfo, Protocol, ServicePort, Subset};

use super::*;

fn loc(s: &str) -> Locality {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn here() -> Here {
    Here {
        cluster: "home".parse().unwrap(),
        locality: loc("us-east/us-east-1a"),
        labels: Labels::new(),
    }
}

fn policy() -> LocalityPolicy {
    crate::config::model::UpstreamConfig::default().locality
}

fn gateway(cluster: &str, locality: &str, n: u8) -> RemoteGateway {
    RemoteGateway {
        cluster: cluster.parse().unwrap(),
        spiffe_id: format!("spiffe://{cluster}.example/isthmus/gateway/gw")
            .parse()
            .unwrap(),
        address: format!("127.0.1.{n}:15443").parse().unwrap(),
        locality: loc(locality),
        labels: Labels::new(),
        live: true,
        weight: 1,
        subsets: vec![],
    }
}

/// An entry with `endpoints` here and `remote` gateways.
fn entry(endpoints: &[&str], remote: Vec<RemoteGateway>) -> ServiceEntry {
    ServiceEntry {
        ports: vec![ServicePort {
            port: 80,
            protocol: Protocol::Http,
            name: None,
        }],
        endpoints: endpoints.iter().map(|e| addr(e)).collect(),
        remote,
        ..ServiceEntry::exported("shop/web".parse().unwrap())
    }
}

/// Plans a first attempt over the whole service with the default policy.
fn plan_all(e: &ServiceEntry, rate: impl Fn(BackendRef<'_>) -> Rated) -> Plan {
    plan(PlanRequest::whole(e), &here(), &policy(), rate)
}

/// Plans `request` with the default policy, everything up.
fn plan_up(request: PlanRequest<'_>) -> Plan {
    plan(request, &here(), &policy(), |_| Rated::UP)
}

/// a: same zone, b: same region, c: another region.
fn three_clusters() -> ServiceEntry {
    entry(
        &[],
        vec![
            gateway("c", "eu-west/eu-west-1a", 3),
            gateway("a", "us-east/us-east-1a", 1),
            gateway("b", "us-east/us-east-1b", 2),
        ],
    )
}

fn down_at(down: &'static [&'static str]) -> impl Fn(BackendRef<'_>) -> Rated {
    move |b| {
        if down.iter().any(|d| addr(d) == b.addr) {
            Rated {
                availability: Availability::Down,
                ramp: 1.0,
            }
        } else {
            Rated::UP
        }
    }
}

/// Share of `n` evenly spread choices that go to each address.
fn shares(plan: &Plan, e: &ServiceEntry, n: usize) -> BTreeMap<SocketAddr, f64> {
    let mut counts: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    let e = &Arc::new(e.clone());
    for i in 0..n {
        let u = (i as f64 + 0.5) / n as f64;
        // Two different low-discrepancy sequences for the two choices.
        let v = ((i as f64) * 0.618_033_988_749_895).fract();
        let t = plan.choose(e, u, v).unwrap();
        *counts.entry(t.addr()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(a, c)| (a, c as f64 / n as f64))
        .collect()
}

fn share(s: &BTreeMap<SocketAddr, f64>, a: &str) -> f64 {
    s.get(&addr(a)).copied().unwrap_or(0.0)
}

#[test]
fn proximity_orders_zone_region_failover_order_then_elsewhere() {
    let order = vec!["ap-south".to_owned()];
    for (me, other, want) in [
        (
            "us-east/us-east-1a",
            "us-east/us-east-1a",
            Proximity::SameZone,
        ),
        (
            "us-east/us-east-1a",
            "us-east/us-east-1b",
            Proximity::SameRegion,
        ),
        ("us-east/us-east-1a", "us-east", Proximity::SameRegion),
        (
            "us-east/us-east-1a",
            "ap-south/x",
            Proximity::FailoverOrder(0),
        ),
        ("us-east/us-east-1a", "eu-west", Proximity::Elsewhere),
        (
            "us-east/us-east-1a/rack7",
            "us-east/us-east-1a/rack7",
            Proximity::SameSubzone,
        ),
        (
            "us-east/us-east-1a/rack7",
            "us-east/us-east-1a/rack8",
            Proximity::SameZone,
        ),
        (
            "us-east/us-east-1a/rack7",
            "us-east/us-east-1a",
            Proximity::SameZone,
        ),
    ] {
        assert_eq!(
            Proximity::of(&loc(me), &loc(other), &order),
            want,
            "{me} ~ {other}"
        );
    }
    assert!(Proximity::SameZone < Proximity::SameRegion);
    assert!(Proximity::FailoverOrder(3) < Proximity::Elsewhere);
}

#[test]
fn the_closest_healthy_level_takes_all_traffic() {
    let e = three_clusters();
    let p = plan_all(&e, |_| Rated::UP);
    let order: Vec<&str> = p
        .levels
        .iter()
        .map(|l| {
            e.remote[match l.members[0].slot {
                Slot::Gateway(i) => i,
                Slot::Endpoint(_) => unreachable!(),
            }]
            .cluster
            .as_str()
        })
        .collect();
    assert_eq!(order, ["a", "b", "c"]);
    assert!(!p.panic);
    let s = shares(&p, &e, 1000);
    assert_eq!(share(&s, "127.0.1.1:15443"), 1.0);
}

#[test]
fn a_dead_level_spills_to_the_next_and_a_retry_goes_there_too() {
    let e = three_clusters();
    let p = plan_all(&e, down_at(&["127.0.1.1:15443"]));
    let s = shares(&p, &e, 1000);
    assert_eq!(
        share(&s, "127.0.1.1:15443"),
        0.0,
        "no new request to the dead cluster"
    );
    assert_eq!(share(&s, "127.0.1.2:15443"), 1.0, "all to the same region");
    // A retry after a failure on a (not yet known down) goes to the next level.
    let tried = [Slot::Gateway(1)];
    assert_eq!(tried[0].backend(&e).addr, addr("127.0.1.1:15443"));
    let p = plan_up(PlanRequest {
        tried: &tried,
        ..PlanRequest::whole(&e)
    });
    assert_eq!(share(&shares(&p, &e, 100), "127.0.1.2:15443"), 1.0);
    // Both closer levels dead: the far region takes over, not panic.
    let p = plan_all(&e, down_at(&["127.0.1.1:15443", "127.0.1.2:15443"]));
    assert!(!p.panic);
    assert_eq!(share(&shares(&p, &e, 100), "127.0.1.3:15443"), 1.0);
}

#[test]
fn overprovisioning_spills_gradually() {
    // Ten endpoints here, a peer in the same zone behind them.
    let eps: Vec<String> = (1..=10).map(|i| format!("127.0.0.{i}:80")).collect();
    let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
    let e = entry(&eps, vec![gateway("a", "us-east/us-east-1a", 1)]);
    // 8 of 10 up: 1.4 × 0.8 ≥ 1, the level keeps everything.
    let p = plan_all(&e, down_at(&["127.0.0.1:80", "127.0.0.2:80"]));
    assert_eq!(p.levels[0].load, 1.0);
    // 5 of 10 up: 1.4 × 0.5 = 0.7 stays, 0.3 spills to the peer.
    let p = plan_all(
        &e,
        down_at(&[
            "127.0.0.1:80",
            "127.0.0.2:80",
            "127.0.0.3:80",
            "127.0.0.4:80",
            "127.0.0.5:80",
        ]),
    );
    assert!(
        (p.levels[0].load - 0.7).abs() < 1e-9,
        "{}",
        p.levels[0].load
    );
    assert!((p.levels[1].load - 0.3).abs() < 1e-9);
    let s = shares(&p, &e, 10_000);
    assert!((share(&s, "127.0.1.1:15443") - 0.3).abs() < 0.01, "{s:?}");
    assert_eq!(share(&s, "127.0.0.1:80"), 0.0);
}

#[test]
fn below_the_panic_threshold_health_is_ignored() {
    let e = entry(
        &[
            "127.0.0.1:80",
            "127.0.0.2:80",
            "127.0.0.3:80",
            "127.0.0.4:80",
        ],
        vec![],
    );
    // 1 of 4 up: 1.4 × 0.25 = 35 % < 50 %.
    let p = plan_all(
        &e,
        down_at(&["127.0.0.1:80", "127.0.0.2:80", "127.0.0.3:80"]),
    );
    assert!(p.panic);
    let s = shares(&p, &e, 1000);
    for a in ["127.0.0.1:80", "127.0.0.4:80"] {
        assert!((share(&s, a) - 0.25).abs() < 0.01, "{s:?}");
    }
    // A panic threshold of 0 never panics: the one up endpoint takes all.
    let mut never = policy();
    never.panic_threshold_percent = 0;
    let p = plan(
        PlanRequest::whole(&e),
        &here(),
        &never,
        down_at(&["127.0.0.1:80", "127.0.0.2:80", "127.0.0.3:80"]),
    );
    assert!(!p.panic);
    assert_eq!(share(&shares(&p, &e, 100), "127.0.0.4:80"), 1.0);
    // Everything down, no panic: a down target rather than a sure error.
    let all = down_at(&[
        "127.0.0.1:80",
        "127.0.0.2:80",
        "127.0.0.3:80",
        "127.0.0.4:80",
    ]);
    let p = plan(PlanRequest::whole(&e), &here(), &never, all);
    assert!(p.choose(&Arc::new(e), 0.3, 0.3).is_ok());
}

#[test]
fn slow_start_brings_a_returning_cluster_back_gradually() {
    let e = three_clusters();
    let ramping = |BackendRef { addr: a, .. }: BackendRef<'_>| Rated {
        availability: Availability::Up,
        ramp: if a == addr("127.0.1.1:15443") {
            0.25
        } else {
            1.0
        },
    };
    let p = plan_all(&e, ramping);
    // 1.4 × 0.25 = 35 % back to a, the rest stays in the same region.
    assert!((p.levels[0].load - 0.35).abs() < 1e-9);
    assert!((p.levels[1].load - 0.65).abs() < 1e-9);
}

#[test]
fn weights_share_a_level() {
    let mut e = entry(&["127.0.0.1:80", "127.0.0.2:80"], vec![]);
    e.endpoint_info.insert(
        addr("127.0.0.1:80"),
        EndpointInfo {
            weight: 3,
            ..EndpointInfo::default()
        },
    );
    let p = plan_all(&e, |_| Rated::UP);
    let s = shares(&p, &e, 10_000);
    assert!((share(&s, "127.0.0.1:80") - 0.75).abs() < 0.01, "{s:?}");
}

/// Replicas a-1 (weight 3) and a-2 (weight 1) of cluster a in this zone, and
/// cluster b in another zone of this region.
fn two_replicas_and_a_neighbour() -> ServiceEntry {
    let replica = |name: &str, n: u8, weight: u32| RemoteGateway {
        spiffe_id: format!("spiffe://a.example/isthmus/gateway/{name}")
            .parse()
            .unwrap(),
        weight,
        ..gateway("a", "us-east/us-east-1a", n)
    };
    entry(
        &[],
        vec![
            replica("a-1", 1, 3),
            replica("a-2", 2, 1),
            gateway("b", "us-east/us-east-1b", 3),
        ],
    )
}

#[test]
fn replicas_share_their_level_by_weight_and_cover_for_each_other_before_it_is_left() {
    let e = two_replicas_and_a_neighbour();
    let s = shares(&plan_all(&e, |_| Rated::UP), &e, 10_000);
    assert!((share(&s, "127.0.1.1:15443") - 0.75).abs() < 0.01, "{s:?}");
    assert!((share(&s, "127.0.1.2:15443") - 0.25).abs() < 0.01, "{s:?}");
    assert_eq!(share(&s, "127.0.1.3:15443"), 0.0, "{s:?}");
    // A retry after a failure on a-1 goes to a-2, not to the next zone.
    let tried = [Slot::Gateway(0)];
    let p = plan_up(PlanRequest {
        tried: &tried,
        ..PlanRequest::whole(&e)
    });
    assert_eq!(share(&shares(&p, &e, 100), "127.0.1.2:15443"), 1.0);
    // a-1 down: a-2 carries the whole cluster, nothing spills to b (the
    // cluster's endpoints are all still there).
    let p = plan_all(&e, down_at(&["127.0.1.1:15443"]));
    assert_eq!(share(&shares(&p, &e, 1000), "127.0.1.2:15443"), 1.0);
    // a-1 back and ramping up: it takes a slice of the cluster's traffic
    // back, by slow start, from a-2; still nothing to b.
    let p = plan_all(&e, |b| Rated {
        availability: Availability::Up,
        ramp: if b.addr == addr("127.0.1.1:15443") { 0.1 } else { 1.0 },
    });
    let s = shares(&p, &e, 10_000);
    let returning = 0.3 / (0.3 + 1.0);
    assert!((share(&s, "127.0.1.1:15443") - returning).abs() < 0.01, "{s:?}");
    assert_eq!(share(&s, "127.0.1.3:15443"), 0.0, "{s:?}");
    // Both replicas down: the cluster is, and b takes over.
    let p = plan_all(&e, down_at(&["127.0.1.1:15443", "127.0.1.2:15443"]));
    assert_eq!(share(&shares(&p, &e, 1000), "127.0.1.3:15443"), 1.0);
}

#[test]
fn a_cluster_counts_once_in_its_level_however_many_replicas_it_has() {
    let mut e = two_replicas_and_a_neighbour();
    // b moves into a's zone: two clusters in one level, half each.
    e.remote[2].locality = loc("us-east/us-east-1a");
    let s = shares(&plan_all(&e, |_| Rated::UP), &e, 10_000);
    assert!((share(&s, "127.0.1.3:15443") - 0.5).abs() < 0.01, "{s:?}");
    assert!((share(&s, "127.0.1.1:15443") - 0.375).abs() < 0.01, "{s:?}");
}

#[test]
fn endpoints_in_another_zone_rank_below_same_zone_peers() {
    let mut e = entry(
        &["127.0.0.1:80"],
        vec![gateway("a", "us-east/us-east-1a", 1)],
    );
    e.endpoint_info.insert(
        addr("127.0.0.1:80"),
        EndpointInfo {
            locality: Some(loc("us-east/us-east-1c")),
            ..EndpointInfo::default()
        },
    );
    let p = plan_all(&e, |_| Rated::UP);
    assert_eq!(p.levels[0].proximity, Proximity::SameZone);
    assert!(p.levels[0].remote);
    assert_eq!(p.levels[1].proximity, Proximity::SameRegion);
}

#[test]
fn scopes_confine_to_a_subset_or_a_cluster() {
    let mut e = entry(
        &["127.0.0.1:80", "127.0.0.2:80"],
        vec![
            gateway("a", "us-east/us-east-1a", 1),
            gateway("b", "eu-west", 2),
        ],
    );
    let v2: Labels = [("version".to_owned(), "v2".to_owned())].into();
    e.endpoint_info.insert(
        addr("127.0.0.2:80"),
        EndpointInfo {
            labels: v2.clone(),
            ..EndpointInfo::default()
        },
    );
    e.subsets = vec![Subset {
        name: "v2".into(),
        labels: v2,
    }];
    e.remote[1].subsets = vec!["v2".into()];
    let scope = Scope {
        subset: Some("v2"),
        cluster: None,
    };
    let p = plan_up(PlanRequest {
        scope,
        ..PlanRequest::whole(&e)
    });
    let addrs: Vec<SocketAddr> = p
        .levels
        .iter()
        .flat_map(|l| l.members.iter().map(|m| m.addr))
        .collect();
    assert_eq!(addrs, [addr("127.0.0.2:80"), addr("127.0.1.2:15443")]);
    // A subset this cluster does not define: only gateways that announce it.
    let scope = Scope {
        subset: Some("v3"),
        cluster: None,
    };
    assert!(
        plan_up(PlanRequest {
            scope,
            ..PlanRequest::whole(&e)
        })
        .is_empty()
    );
    let b: ClusterName = "b".parse().unwrap();
    let scope = Scope {
        subset: None,
        cluster: Some(&b),
    };
    let p = plan_up(PlanRequest {
        scope,
        ..PlanRequest::whole(&e)
    });
    assert_eq!(p.levels.len(), 1);
    assert_eq!(p.levels[0].members[0].addr, addr("127.0.1.2:15443"));
    // From east-west, peers never count.
    let p = plan_up(PlanRequest {
        local_only: true,
        ..PlanRequest::whole(&e)
    });
    assert!(p.levels.iter().all(|l| !l.remote));
}

#[test]
fn full_targets_are_skipped_and_all_full_is_overloaded() {
    let e = entry(&["127.0.0.1:80", "127.0.0.2:80"], vec![]);
    let one_full = |BackendRef { addr: a, .. }: BackendRef<'_>| Rated {
        availability: if a.port() == 80 && a.ip().to_string() == "127.0.0.1" {
            Availability::Full
        } else {
            Availability::Up
        },
        ramp: 1.0,
    };
    let p = plan_all(&e, one_full);
    assert_eq!(share(&shares(&p, &e, 100), "127.0.0.2:80"), 1.0);
    let full = |_: BackendRef<'_>| Rated {
        availability: Availability::Full,
        ramp: 1.0,
    };
    let p = plan_all(&e, full);
    assert_eq!(p.choose(&Arc::new(e), 0.5, 0.5), Err(NoTarget::Overloaded));
    let none = entry(&[], vec![]);
    let p = plan_all(&none, |_| Rated::UP);
    assert_eq!(
        p.choose(&Arc::new(none), 0.5, 0.5),
        Err(NoTarget::NoEndpoint)
    );
}

#[test]
fn failover_priority_labels_come_before_locality() {
    let label = |v: &str| -> Labels { [("network".to_owned(), v.to_owned())].into() };
    let mut me = here();
    me.labels = label("n1");
    // Same zone but another network; another region on this network.
    let mut near = gateway("near", "us-east/us-east-1a", 1);
    near.labels = label("n2");
    let mut far = gateway("far", "eu-west", 2);
    far.labels = label("n1");
    let e = entry(&["127.0.0.1:80"], vec![near, far]);
    let mut by_network = policy();
    by_network.failover_priority = vec!["network".into()];
    let p = plan(PlanRequest::whole(&e), &me, &by_network, |_| Rated::UP);
    let order: Vec<(usize, Proximity, bool)> = p
        .levels
        .iter()
        .map(|l| (l.label_rank, l.proximity, l.remote))
        .collect();
    // The local endpoint inherits this gateway's labels.
    assert_eq!(
        order,
        [
            (0, Proximity::SameZone, false),
            (0, Proximity::Elsewhere, true),
            (1, Proximity::SameZone, true)
        ]
    );
    // Without a failover priority, locality alone decides.
    let p = plan(PlanRequest::whole(&e), &me, &policy(), |_| Rated::UP);
    assert_eq!(p.levels[1].proximity, Proximity::SameZone);
    assert!(p.levels[1].remote);
}

#[test]
fn a_scope_with_nothing_available_falls_back_to_the_whole_service() {
    let e = three_clusters();
    let planner = |scope: Scope<'_>| {
        plan_up(PlanRequest {
            scope,
            ..PlanRequest::whole(&e)
        })
    };
    let a: ClusterName = "a".parse().unwrap();
    let in_a = Scope {
        subset: None,
        cluster: Some(&a),
    };
    let (p, fell_back) = plan_or_fall_back(in_a, planner);
    assert!(!fell_back);
    assert_eq!(p.levels.len(), 1);
    let v9 = Scope {
        subset: Some("v9"),
        cluster: None,
    };
    let (p, fell_back) = plan_or_fall_back(v9, planner);
    assert!(fell_back, "no gateway announces v9");
    assert_eq!(p.levels.len(), 3);
    let (_, fell_back) = plan_or_fall_back(Scope::default(), planner);
    assert!(!fell_back);
}

/// An endpoint here and a peer gateway in the same zone that claims the
/// endpoint's address (a static peer, a race, an address reused).
fn endpoint_and_gateway_sharing_an_address() -> ServiceEntry {
    let mut gw = gateway("a", "us-east/us-east-1a", 1);
    gw.address = addr("127.0.0.1:80");
    entry(&["127.0.0.1:80"], vec![gw])
}

/// Rates the peer gateway (by identity) with `peer` and everything else up.
fn peer_rated(peer: Rated) -> impl Fn(BackendRef<'_>) -> Rated {
    move |b| if b.peer.is_some() { peer } else { Rated::UP }
}

#[test]
fn a_peer_sharing_an_endpoints_address_down_or_slow_leaves_the_endpoint_whole() {
    let e = endpoint_and_gateway_sharing_an_address();
    let endpoint = Slot::Endpoint(0).backend(&e);
    let peer = Slot::Gateway(0).backend(&e);
    assert_eq!(endpoint.addr, peer.addr);
    assert_ne!(endpoint, peer, "one address, two identities");
    let down = Rated {
        availability: Availability::Down,
        ramp: 1.0,
    };
    let slow = Rated {
        availability: Availability::Up,
        ramp: 0.1,
    };
    for rated in [down, slow] {
        let p = plan_all(&e, peer_rated(rated));
        assert!(!p.panic);
        let local = &p.levels[0];
        assert!(!local.remote);
        assert_eq!(local.members[0].rated, Rated::UP, "{rated:?}");
        assert_eq!(local.health, 1.0);
        assert_eq!(local.load, 1.0);
        assert_eq!(local.members[0].effective_weight(), 1.0);
        let picks = (0..100)
            .map(|i| p.pick((f64::from(i) + 0.5) / 100.0, 0.5).unwrap())
            .filter(|s| *s == Slot::Endpoint(0))
            .count();
        assert_eq!(picks, 100, "the endpoint keeps all the traffic");
    }
    // A retry after the peer failed may still go to the endpoint: it is
    // another backend, not one already tried.
    let p = plan_up(PlanRequest {
        tried: &[Slot::Gateway(0)],
        ..PlanRequest::whole(&e)
    });
    assert!(!p.levels[0].members[0].tried);
    assert!(p.levels[1].members[0].tried);
    assert_eq!(p.pick(0.5, 0.5), Ok(Slot::Endpoint(0)));
}

#[test]
fn an_endpoint_down_or_slow_leaves_a_peer_sharing_its_address_whole() {
    let e = endpoint_and_gateway_sharing_an_address();
    let endpoint_rated = |rated: Rated| {
        move |b: BackendRef<'_>| {
            if b.peer.is_none() { rated } else { Rated::UP }
        }
    };
    let down = Rated {
        availability: Availability::Down,
        ramp: 1.0,
    };
    let p = plan_all(&e, endpoint_rated(down));
    assert!(!p.panic);
    assert_eq!(p.levels[1].members[0].rated, Rated::UP);
    assert_eq!(p.levels[1].load, 1.0, "the peer takes over at full weight");
    assert_eq!(p.pick(0.5, 0.5), Ok(Slot::Gateway(0)));
    // Tried the endpoint: the peer at the same address is not tried.
    let p = plan_up(PlanRequest {
        tried: &[Slot::Endpoint(0)],
        ..PlanRequest::whole(&e)
    });
    assert_eq!(p.pick(0.5, 0.5), Ok(Slot::Gateway(0)));
}

/// Replica `name` of `cluster`'s gateways: its own SPIFFE ID and address.
fn replica(cluster: &str, name: &str, locality: &str, n: u8) -> RemoteGateway {
    RemoteGateway {
        spiffe_id: format!("spiffe://{cluster}.example/isthmus/gateway/{name}")
            .parse()
            .unwrap(),
        ..gateway(cluster, locality, n)
    }
}

/// a's two replicas in this zone (a1, a2), c in another region; sorted by
/// cluster and SPIFFE ID, as the catalog keeps them.
fn replicated_cluster() -> ServiceEntry {
    entry(
        &[],
        vec![
            replica("a", "a1", "us-east/us-east-1a", 1),
            replica("a", "a2", "us-east/us-east-1a", 2),
            gateway("c", "eu-west/eu-west-1a", 3),
        ],
    )
}

#[test]
fn replicas_of_a_cluster_cover_for_each_other_before_traffic_leaves_its_level() {
    let (a1, a2, c) = ("127.0.1.1:15443", "127.0.1.2:15443", "127.0.1.3:15443");
    let e = replicated_cluster();
    // Both up: they share a's traffic, c gets none.
    let s = shares(&plan_all(&e, |_| Rated::UP), &e, 10_000);
    assert!((share(&s, a1) - 0.5).abs() < 0.01, "{s:?}");
    assert!((share(&s, a2) - 0.5).abs() < 0.01, "{s:?}");
    assert_eq!(share(&s, c), 0.0);
    // a1 down: a is still whole behind a2 (a replica is a way in, not a
    // share of a's endpoints), so its level keeps everything.
    let p = plan_all(&e, down_at(&["127.0.1.1:15443"]));
    assert_eq!(p.levels[0].load, 1.0, "{p:?}");
    let s = shares(&p, &e, 1000);
    assert_eq!(
        (share(&s, a1), share(&s, a2), share(&s, c)),
        (0.0, 1.0, 0.0)
    );
    // A retry after a1 failed (not yet known down) goes to a2, not to c.
    let tried = [Slot::Gateway(0)];
    let p = plan_up(PlanRequest {
        tried: &tried,
        ..PlanRequest::whole(&e)
    });
    assert_eq!(share(&shares(&p, &e, 100), a2), 1.0);
    // a1 back, ramping at 10 %: a2 carries a's level meanwhile, a1 gets its
    // slowly growing share of it.
    let returning = |b: BackendRef<'_>| Rated {
        availability: Availability::Up,
        ramp: if b.addr == addr(a1) { 0.1 } else { 1.0 },
    };
    let p = plan_all(&e, returning);
    assert_eq!(p.levels[0].load, 1.0);
    let s = shares(&p, &e, 10_000);
    assert!((share(&s, a1) - 0.1 / 1.1).abs() < 0.01, "{s:?}");
    assert_eq!(share(&s, c), 0.0);
    // a1 ramping and a2 down: a is back at a1's pace, like a cluster with
    // one gateway (1.4 × 0.25 = 35 % to a).
    let only_a1_ramping = |b: BackendRef<'_>| Rated {
        availability: if b.addr == addr(a2) {
            Availability::Down
        } else {
            Availability::Up
        },
        ramp: if b.addr == addr(a1) { 0.25 } else { 1.0 },
    };
    let p = plan_all(&e, only_a1_ramping);
    assert!((p.levels[0].load - 0.35).abs() < 1e-9, "{p:?}");
    // Both down: c takes everything.
    let p = plan_all(&e, down_at(&["127.0.1.1:15443", "127.0.1.2:15443"]));
    assert!(!p.panic);
    assert_eq!(share(&shares(&p, &e, 100), c), 1.0);
}
