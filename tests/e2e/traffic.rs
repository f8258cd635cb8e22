//! Traffic splitting with real gateways: a v1 90 / v2 10 canary by subsets
//! and a header-match route on one gateway, and per-cluster weights across a
//! federation. Each split must hold its weights within 3 percentage points
//! over 2,000 requests.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::BTreeMap;
use std::time::Duration;

use isthmus_tests::load::{Load, LoadSpec, Report};
use isthmus_tests::mesh::{Mesh, remote_clusters};
use isthmus_tests::{Behaviour, EchoServer, Gateway, curl, solo_gateway_with, wait_for};

const START: Duration = Duration::from_secs(20);
/// Requests per measured split.
const REQUESTS: usize = 2000;
/// Largest accepted distance from a weight, in percentage points.
const TOLERANCE_PP: f64 = 3.0;

/// Sends [`REQUESTS`] GETs for `authority` to `outbound` and counts who served them.
fn measure(outbound: std::net::SocketAddr, authority: &str) -> (Report, BTreeMap<String, usize>) {
    let mut spec = LoadSpec::new(outbound, authority);
    spec.rate = 500.0;
    let load = Load::start(spec);
    wait_for(Duration::from_secs(30), "2,000 requests", || {
        (load.snapshot().total() >= REQUESTS).then_some(())
    })
    .unwrap();
    let report = load.stop();
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for s in report.samples.iter().take(REQUESTS) {
        *by.entry(s.served_by().unwrap_or("(failed)").to_owned())
            .or_default() += 1;
    }
    (report, by)
}

/// Checks that `who` served `weight` % of the first [`REQUESTS`], within the tolerance.
fn assert_share(by: &BTreeMap<String, usize>, who: &str, weight: f64) {
    let share = 100.0 * by.get(who).copied().unwrap_or(0) as f64 / REQUESTS as f64;
    eprintln!("MEASURED {who}: {share:.2} % of {REQUESTS} (weight {weight} %)");
    assert!(
        (share - weight).abs() <= TOLERANCE_PP,
        "{who} served {share:.2} %, expected {weight} ± {TOLERANCE_PP}: {by:?}"
    );
}

#[test]
fn a_canary_split_by_subsets_holds_its_weights_and_a_header_picks_the_canary() {
    let v1 = [EchoServer::start("v1-a"), EchoServer::start("v1-b")];
    let v2 = EchoServer::start("v2");
    let endpoints = format!(
        r#"
  {{ address = "{}", labels = {{ version = "v1" }} }},
  {{ address = "{}", labels = {{ version = "v1" }} }},
  {{ address = "{}", labels = {{ version = "v2" }} }},
"#,
        v1[0].addr, v1[1].addr, v2.addr
    );
    let (gw, outbound) = solo_gateway_with(
        &endpoints,
        r#"subsets = [
  { name = "v1", labels = { version = "v1" } },
  { name = "v2", labels = { version = "v2" } },
]
[[routes]]
service = "shop/web"
[[routes.rules]]
headers = [{ name = "x-canary", exact = "always" }]
split = [{ subset = "v2", weight = 100 }]
[[routes.rules]]
split = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]
"#,
    )
    .unwrap();
    let authority = "web.shop.svc.clusterset.local";

    let (report, by) = measure(outbound, authority);
    assert!(report.failures().is_empty(), "{}", report.summary());
    let v1_share = by.get("v1-a").copied().unwrap_or(0) + by.get("v1-b").copied().unwrap_or(0);
    let mut merged = by.clone();
    merged.insert("v1".into(), v1_share);
    assert_share(&merged, "v1", 90.0);
    assert_share(&merged, "v2", 10.0);
    // Within v1, the two endpoints share its traffic evenly.
    assert_share(&by, "v1-a", 45.0);

    // The header rule comes first: every such request goes to v2.
    let url = format!("http://{outbound}/");
    for _ in 0..20 {
        let r = curl(&[
            "-H",
            &format!("Host: {authority}"),
            "-H",
            "x-canary: always",
            &url,
        ]);
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.contains("\"served_by\":\"v2\""), "{}", r.body);
    }
    // A value that does not match falls through to the split.
    let r = curl(&[
        "-H",
        &format!("Host: {authority}"),
        "-H",
        "x-canary: no",
        &url,
    ]);
    assert_eq!(r.status, 200);

    // Explain shows both rules and their destinations' weights.
    let explain = gw.admin_json("/debug/explain?service=shop/web");
    let weights: Vec<(Option<u64>, Option<&str>, f64)> = explain["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["rule"].as_u64(),
                d["subset"].as_str(),
                d["weight_percent"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        weights,
        [
            (Some(0), Some("v2"), 100.0),
            (Some(1), Some("v1"), 90.0),
            (Some(1), Some("v2"), 10.0)
        ],
        "{explain:#}"
    );

    // The canary breaks (closes every connection without answering): its
    // requests are retried on v1, it is ejected, and its share goes to v1.
    v2.set(Behaviour::Close);
    let (report, by) = measure(outbound, authority);
    assert!(report.failures().is_empty(), "{}", report.summary());
    assert_eq!(by.get("v2"), None, "{by:?}");
}

#[test]
fn per_cluster_weights_split_a_federated_service() {
    let mut mesh = Mesh::new(&["a", "b", "c"]);
    // A is closer to C than B; the weights, not locality, decide here.
    mesh.set_locality(0, "us-east", Some("us-east-1a"));
    mesh.set_locality(1, "eu-west", Some("eu-west-1a"));
    mesh.set_locality(2, "us-east", Some("us-east-1a"));
    let echo = [
        EchoServer::start("gw-a-cluster"),
        EchoServer::start("gw-b-cluster"),
    ];
    let service = |addr| {
        format!(
            "[[services]]\nnamespace = \"shop\"\nname = \"web\"\nports = [{{ port = 8080 }}]\nendpoints = [\"{addr}\"]\nexport = true\n"
        )
    };
    let routes = r#"[[routes]]
service = "shop/web"
[[routes.rules]]
split = [{ cluster = "gw-a-cluster", weight = 70 }, { cluster = "gw-b-cluster", weight = 30 }]
"#;
    let mut gws: Vec<Gateway> = [
        service(echo[0].addr),
        service(echo[1].addr),
        routes.to_owned(),
    ]
    .iter()
    .enumerate()
    .map(|(i, extra)| {
        Gateway::start(&mesh.full_config(i, extra), mesh.members[i].admin, &[]).unwrap()
    })
    .collect();
    for gw in &mut gws {
        gw.wait_ready(START).unwrap();
    }
    wait_for(START, "C to see shop/web in A and B", || {
        let mut clusters = remote_clusters(&gws[2], "shop/web")?;
        clusters.sort();
        (clusters == ["gw-a-cluster", "gw-b-cluster"]).then_some(())
    })
    .unwrap();
    let (report, by) = measure(
        mesh.members[2].outbound,
        "web.shop.svc.clusterset.local:8080",
    );
    assert!(report.failures().is_empty(), "{}", report.summary());
    assert_share(&by, "gw-a-cluster", 70.0);
    assert_share(&by, "gw-b-cluster", 30.0);
}
