//! Every configuration key is documented in `docs/configuration.md`.
//!
//! How the keys are enumerated, so that a new one cannot be missed silently:
//! [`EVERY_KEY`] sets every key of the file format. It is parsed into the raw
//! configuration (`RawConfig`: every table denies unknown keys, so a key that
//! does not exist fails the parse) and serialized back to JSON. Every leaf of
//! the raw structures is an `Option` serialized without `skip_serializing_if`,
//! so a key that [`EVERY_KEY`] leaves out comes back as `null`; the test fails
//! naming it, and a new field added to any raw struct therefore fails this test
//! until it is set here and documented. Arrays must hold one element so that
//! the fields of their tables are walked too (`services[].ports[].port`); an
//! empty JSON object can only be a free-form map (labels) and is a leaf. Each
//! resulting path (`upstream.health_check.interval`, `services[].endpoints[].weight`)
//! must appear in `docs/configuration.md` in backquotes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test reports failure

use std::path::Path;

use isthmus_gateway::config::raw::RawConfig;
use serde_json::Value;

/// A configuration setting every key (the values need only parse, not validate).
const EVERY_KEY: &str = r#"
[gateway]
name = "gw"
cluster = "east"
trust_domain = "east.example.org"
labels = {}
[gateway.locality]
region = "us-east"
zone = "us-east-1a"
subzone = "rack-1"

[admin]
listen = "127.0.0.1:15000"

[log]
level = "info"
format = "auto"
access_sample = 1.0

[runtime]
threads = 2
upgrade_socket = "/run/isthmus/upgrade.sock"

[shutdown]
drain_timeout = "10s"

[identity]
cert = "svid.crt"
key = "svid.key"
bundle = "bundle.pem"

[trust]
allow_ids = ["spiffe://west.example.org/isthmus/gateway/gw"]
allow_trust_domains = ["west.example.org"]
refresh_interval = "5m"
[[trust.federated]]
trust_domain = "west.example.org"
bundle = "west.pem"
endpoint_url = "https://gw.west.example.org:15013/"
endpoint_profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://west.example.org/isthmus/gateway/gw"
endpoint_ca = "roots.pem"
accept_peer_bundles = false
[trust.bundle_endpoint]
listen = "0.0.0.0:15013"
refresh_hint = "5m"

[listeners]
outbound = "127.0.0.1:15001"
east_west = "0.0.0.0:15443"

[[services]]
namespace = "shop"
name = "web"
ports = [{ port = 8080, protocol = "http", listen = "127.0.0.1:18080", name = "http" }]
endpoints = [{ address = "10.0.0.5:8080", locality = "us-east/us-east-1a", labels = {}, weight = 1 }]
subsets = [{ name = "v2", labels = {} }]
export = true
allow_ids = ["spiffe://west.example.org/ns/shop/sa/web"]
allow_trust_domains = ["west.example.org"]
mode = "terminate"
allow_sources = ["10.20.0.0/16"]
headless = false

[[peers]]
cluster = "west"
spiffe_id = "spiffe://west.example.org/isthmus/gateway/gw"
address = "192.0.2.10:15443"
locality = "eu-west/eu-west-1a"
services = ["shop/web"]

[[routes]]
service = "shop/web"
[[routes.rules]]
headers = [{ name = "x-canary", exact = "true", prefix = "t", present = true }]
split = [{ subset = "v2", cluster = "west", weight = 100 }]

[upstream]
connect_timeout = "2s"
request_timeout = "30s"
idle_timeout = "5m"
max_attempts = 3
retry_budget_percent = 20
retry_min_per_second = 10
[upstream.circuit_breaker]
max_connections = 1024
max_pending_requests = 1024
max_requests = 1024
[upstream.outlier_detection]
consecutive_failures = 5
base_ejection_time = "30s"
max_ejection_time = "5m"
max_ejection_percent = 50
[upstream.health_check]
interval = "5s"
timeout = "1s"
unhealthy_threshold = 2
healthy_threshold = 1
[upstream.locality]
failover_order = ["eu-west"]
failover_priority = ["network"]
overprovisioning_factor = 1.4
panic_threshold_percent = 50
slow_start_window = "10s"

[federation]
listen = "0.0.0.0:15012"
advertise = "192.0.2.5:15443"
lease = "1.5s"
weight = 2
grace = "30s"
accept_peer_bundles = false
export = ["*/*"]
state_file = "/var/lib/isthmus/federation-state.json"
[[federation.peers]]
address = "192.0.2.10:15012"
spiffe_id = "spiffe://west.example.org/isthmus/gateway/gw"
clusters = ["west"]
localities = ["eu-west"]
import = ["shop/*"]
export = ["shop/*"]
[[federation.accept]]
trust_domain = "vms.example.org"
clusters = ["vms-eu"]
localities = ["eu-west"]
import = ["*/*"]
export = ["*/*"]
[federation.limits]
max_services_per_peer = 10000
max_ports_per_service = 128
max_endpoints_per_service = 1000
max_message_bytes = 4194304
max_sessions_per_peer = 4
max_streams_per_connection = 4
max_connections = 1024
max_connections_per_source = 16
max_handshakes = 64
peer_retention = "1h"

[discovery]
files = ["services.d/payments.toml"]
dns_resolvers = ["10.0.0.2"]
dns_min_ttl = "1s"
dns_max_ttl = "5m"
dns_timeout = "3s"
[[discovery.dns]]
namespace = "payments"
name = "ledger"
ports = [{ port = 8080, protocol = "http", listen = "127.0.0.1:18081", name = "http" }]
export = true
allow_ids = ["spiffe://west.example.org/ns/shop/sa/web"]
allow_trust_domains = ["west.example.org"]
mode = "terminate"
headless = false
query = "_http._tcp.ledger.example.internal"
record = "srv"
port = 8080
[discovery.kubernetes]
kubeconfig = "/etc/isthmus/kubeconfig"
context = "east"
namespaces = ["payments"]

[dns]
listen = "127.0.0.1:15053"
ttl = "5s"
clusterset_ipv4_range = "127.240.0.0/16"
clusterset_ipv6_range = "fd00:69::/112"
state_file = "/var/lib/isthmus/clusterset-ips.json"
clusterset_listeners = true
upstreams = ["10.0.0.2"]
forward_timeout = "2s"
cache_size = 10000
allow_sources = ["127.0.0.0/8"]
rate_limit = 200
rate_limit_burst = 400
rate_limit_slip = 2
tcp_max_connections = 512
tcp_max_connections_per_source = 16
tcp_idle_timeout = "10s"

[limits]
header_timeout = "10s"
h2_max_concurrent_streams = 100
max_request_header_bytes = 65536
[limits.outbound]
connections = 16384
connections_per_source = 4096
[limits.east_west]
connections = 16384
connections_per_source = 1024
handshakes = 4096
handshakes_per_source = 1024
[limits.admin]
connections = 256
connections_per_source = 64
[limits.bundle_endpoint]
connections = 1024
connections_per_source = 64

[tracing]
endpoint = "http://127.0.0.1:4317"
protocol = "grpc"
headers = {}
sample_ratio = 0.01
batch_size = 512
queue_size = 4096
export_timeout = "10s"
"#;

/// Walks `value`, pushing each leaf's dotted path into `keys` and each key
/// `EVERY_KEY` left unset (or set to an empty list) into `unset`.
fn walk(path: &str, value: &Value, keys: &mut Vec<String>, unset: &mut Vec<String>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match value {
        Value::Null => unset.push(path.to_owned()),
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                walk(&join(k), v, keys, unset);
            }
        }
        Value::Array(items) => match items.first() {
            None => unset.push(format!("{path} (an empty list: give it one element)")),
            Some(first @ Value::Object(_)) => walk(&format!("{path}[]"), first, keys, unset),
            Some(_) => keys.push(path.to_owned()),
        },
        _ => keys.push(path.to_owned()),
    }
}

/// Every key of the file format, as documented paths.
fn every_key() -> Vec<String> {
    let raw: RawConfig = toml::from_str(EVERY_KEY).expect("EVERY_KEY is not a valid file shape");
    let json = serde_json::to_value(&raw).unwrap();
    let (mut keys, mut unset) = (Vec::new(), Vec::new());
    walk("", &json, &mut keys, &mut unset);
    assert!(
        unset.is_empty(),
        "EVERY_KEY in gateway/tests/config_doc.rs must set every configuration key \
         (then document it in docs/configuration.md); unset:\n  {}",
        unset.join("\n  ")
    );
    keys
}

#[test]
fn every_configuration_key_is_documented() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let keys = every_key();
    // A sanity floor: the walk found the tables' leaves, not just the sections.
    assert!(keys.len() > 150, "only {} keys found: {keys:?}", keys.len());
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} configuration key(s) missing from docs/configuration.md (each must appear \
         in backquotes, e.g. `{}`):\n  {}",
        missing.len(),
        missing[0],
        missing
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

/// The walk itself: a key left out of a table is reported, by path.
#[test]
fn an_unset_key_is_reported_by_path() {
    let raw: RawConfig = toml::from_str("[upstream.health_check]\ninterval = \"5s\"\n").unwrap();
    let json = serde_json::to_value(&raw).unwrap();
    let (mut keys, mut unset) = (Vec::new(), Vec::new());
    walk("", &json, &mut keys, &mut unset);
    assert!(
        keys.contains(&"upstream.health_check.interval".to_owned()),
        "{keys:?}"
    );
    assert!(
        unset.contains(&"upstream.health_check.timeout".to_owned()),
        "{unset:?}"
    );
    assert!(unset.contains(&"services".to_owned()), "{unset:?}");
}
