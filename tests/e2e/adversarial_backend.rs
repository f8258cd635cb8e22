//! Backend state is kept by identity, not by the address a peer claims: a
//! peer gateway configured (or advertised) at the address of an endpoint in
//! this cluster fails, is marked down, is cut and is ejected on its own,
//! while the endpoint at that address keeps serving every request.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_tests::two_clusters::{TwoDomains, peer};
use isthmus_tests::{
    EchoServer, Gateway, curl, free_addr, metric_value, served_by, upstream_backends, wait_for,
};

const START: Duration = Duration::from_secs(20);
const HOST: &str = "Host: web.shop.svc.clusterset.local";
const EVIL: &str = "spiffe://b.example/isthmus/gateway/gw-evil";

/// Gateway A (cluster `gw-a-cluster`) serving shop/web from `local`, with a
/// static peer `evil-cluster` (SPIFFE ID [`EVIL`]) configured at the same
/// address, serving shop/web too; `extra` is appended to its config.
/// Returns it with its outbound URL. Nothing at `local` speaks mTLS, so every
/// probe of and connection to the peer fails.
fn gateway_with_a_peer_at(local: SocketAddr, extra: &str) -> (Gateway, String, TwoDomains) {
    let domains = TwoDomains::new();
    let (admin, outbound) = (free_addr(), free_addr());
    let config = domains.a_outbound_config(
        admin,
        outbound,
        &format!(
            "endpoints = [\"{local}\"]\n{peer}{extra}",
            peer = peer("evil-cluster", EVIL, local, Some(&["shop/web"])),
        ),
    );
    let mut gw = Gateway::start(&config, admin, &[]).unwrap();
    gw.wait_ready(START).unwrap();
    (gw, format!("http://{outbound}/"), domains)
}

/// `/debug/upstreams`' shop/web backend at `addr` with `identity` (none: the
/// endpoint here).
fn backend_state(gw: &Gateway, addr: SocketAddr, identity: Option<&str>) -> serde_json::Value {
    upstream_backends(gw, "shop/web")
        .into_iter()
        .find(|b| b["address"] == addr.to_string() && b["identity"].as_str() == identity)
        .unwrap_or(serde_json::Value::Null)
}

/// Sends `n` requests; asserts every one got a 200 from the endpoint `local`.
fn all_answered_by_local(url: &str, n: usize) {
    for i in 0..n {
        let r = curl(&["-H", HOST, url]);
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        assert_eq!(served_by(&r), "local", "request {i}: {}", r.body);
    }
}

/// Active health: the peer's mTLS probes at the endpoint's address fail, so
/// the peer is marked down and cut; the endpoint's own probes pass, and it
/// stays up at full weight with every request answered meanwhile. (With
/// health kept by address, the two probes' results landed on one record:
/// the endpoint was marked down whenever the peer's probe failed.)
#[test]
fn a_static_peer_at_an_endpoints_address_failing_probes_never_marks_the_endpoint_down() {
    let local = EchoServer::start("local");
    let (gw, url, _pki) = gateway_with_a_peer_at(
        local.addr,
        r#"[upstream]
connect_timeout = "500ms"
[upstream.health_check]
interval = "200ms"
timeout = "500ms"
unhealthy_threshold = 1
healthy_threshold = 1"#,
    );
    let addr = local.addr;
    let cut = format!(
        "isthmus_upstream_peer_cuts_total{{identity=\"{EVIL}\",peer=\"{addr}\",reason=\"health_check\"}}"
    );
    let peer_healthy =
        format!("isthmus_upstream_healthy{{backend=\"{addr}\",identity=\"{EVIL}\"}}");
    let endpoint_healthy = format!("isthmus_upstream_healthy{{backend=\"{addr}\",identity=\"\"}}");
    // The refusal: the peer failed its probe, was marked down and cut.
    wait_for(
        Duration::from_secs(10),
        "the peer to be marked down",
        || {
            let m = gw.admin_get("/metrics").body;
            (metric_value(&m, &cut).is_some_and(|v| v >= 1.0)
                && metric_value(&m, &peer_healthy) == Some(0.0))
            .then_some(())
        },
    )
    .unwrap();
    // The collision is seen and reported once, state kept apart.
    let m = gw.admin_get("/metrics").body;
    assert_eq!(
        metric_value(&m, "isthmus_upstream_shared_addresses"),
        Some(1.0),
        "{m}"
    );
    gw.wait_log("several backends share one address", Duration::from_secs(5))
        .unwrap();
    // Legitimate traffic through many probe rounds: every request answered
    // by the endpoint, whose health never wavers.
    for round in 0..10 {
        all_answered_by_local(&url, 20);
        let m = gw.admin_get("/metrics").body;
        assert_eq!(
            metric_value(&m, &endpoint_healthy),
            Some(1.0),
            "round {round}: {m}"
        );
        assert_eq!(metric_value(&m, &peer_healthy), Some(0.0), "round {round}");
    }
    let explain = gw.admin_json("/debug/explain?service=shop/web");
    let targets: Vec<serde_json::Value> = explain["destinations"][0]["levels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["targets"].as_array().cloned().unwrap_or_default())
        .collect();
    let endpoint = targets.iter().find(|t| t["kind"] == "endpoint").unwrap();
    assert_eq!(endpoint["state"], "up", "{explain:#}");
    assert_eq!(endpoint["effective_weight"], 1.0, "{explain:#}");
    assert_eq!(endpoint["load_percent"], 100.0, "{explain:#}");
    let peer = targets.iter().find(|t| t["kind"] == "gateway").unwrap();
    assert_eq!(peer["identity"], EVIL, "{explain:#}");
    assert_eq!(peer["state"], "down", "{explain:#}");
    assert!(
        peer["reasons"]
            .to_string()
            .contains("fails active health checks"),
        "{explain:#}"
    );
}

/// Passive health: half the requests are routed to the peer's cluster; its
/// connections fail, it is ejected, and those requests are retried on the
/// endpoint. Only the peer is ejected; every request is answered. (With
/// outlier state kept by address, the peer's failures ejected the endpoint.)
#[test]
fn a_static_peer_at_an_endpoints_address_is_ejected_alone() {
    let local = EchoServer::start("local");
    let (gw, url, _pki) = gateway_with_a_peer_at(
        local.addr,
        r#"[[routes]]
service = "shop/web"
[[routes.rules]]
split = [{ cluster = "evil-cluster", weight = 50 }, { cluster = "gw-a-cluster", weight = 50 }]
[upstream]
connect_timeout = "500ms"
[upstream.health_check]
interval = "0s"
[upstream.outlier_detection]
consecutive_failures = 3
base_ejection_time = "60s""#,
    );
    let addr = local.addr;
    all_answered_by_local(&url, 100);
    let peer = backend_state(&gw, addr, Some(EVIL));
    assert_eq!(peer["ejected"], true, "{peer}");
    let endpoint = backend_state(&gw, addr, None);
    assert_eq!(endpoint["ejected"], false, "{endpoint}");
    assert_eq!(endpoint["healthy"], true, "{endpoint}");
    let m = gw.admin_get("/metrics").body;
    let peer_ejections = format!(
        "isthmus_upstream_ejections_total{{backend=\"{addr}\",identity=\"{EVIL}\",namespace=\"shop\",service=\"web\"}}"
    );
    let endpoint_ejections = format!(
        "isthmus_upstream_ejections_total{{backend=\"{addr}\",identity=\"\",namespace=\"shop\",service=\"web\"}}"
    );
    assert_eq!(metric_value(&m, &peer_ejections), Some(1.0), "{m}");
    assert_eq!(metric_value(&m, &endpoint_ejections), None, "{m}");
    // Still all answered with the peer out.
    all_answered_by_local(&url, 50);
}
