use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use isthmus_federation::peering::PeeringLimits;

const NO_ENV: [(String, String); 0] = [];

/// The smallest valid configuration, as a macro so other constants can extend it.
macro_rules! minimal {
    () => {
        r#"
[gateway]
name = "gw-1"
cluster = "east"
trust_domain = "east.example.org"
[gateway.locality]
region = "us-east"
"#
    };
}

const MINIMAL: &str = minimal!();

/// `minimal!()` with an identity and the federated trust domain
/// `west.example.org`, which the data plane and federation cases build on.
macro_rules! with_west {
    () => {
        concat!(
            minimal!(),
            r#"[identity]
cert = "svid.crt"
key = "svid.key"
bundle = "bundle.pem"
[[trust.federated]]
trust_domain = "west.example.org"
bundle = "west.pem"
"#
        )
    };
}

fn shipped_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut files = vec![root.join("isthmus.toml")];
    let examples = std::fs::read_dir(root.join("examples")).expect("config/examples exists");
    for entry in examples {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    assert!(files.len() >= 3, "expected the packaged file and examples");
    files
}

fn errors_of(text: &str) -> ConfigErrors {
    parse_with_env(text, "test.toml", NO_ENV).expect_err("configuration should be rejected")
}

/// `MINIMAL` with `line` added to `[section]` (appended as a new table when absent).
fn with(section: &str, line: &str) -> String {
    let mut table: toml::Table = MINIMAL.parse().expect("MINIMAL is TOML");
    let (key, value) = line.split_once('=').expect("key = value");
    let value: toml::Value = format!("v = {value}")
        .parse::<toml::Table>()
        .expect("value")["v"]
        .clone();
    let mut node = &mut table;
    for part in section.split('.') {
        node = node
            .entry(part)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .expect("a table");
    }
    node.insert(key.trim().to_owned(), value);
    toml::to_string(&table).expect("serializable")
}

fn assert_rejects(section: &str, line: &str, path: &str) {
    let errors = errors_of(&with(section, line));
    assert!(
        errors.mentions(path),
        "expected an error at {path} for `{line}` in [{section}], got:\n{errors}"
    );
}

#[test]
fn every_shipped_file_validates() {
    for file in shipped_files() {
        if let Err(e) = load_with_env(&file, NO_ENV) {
            panic!("{} is invalid:\n{e}", file.display());
        }
    }
}

/// Every table of every shipped file, with an unknown key injected, is rejected
/// with an error naming exactly that key's path.
#[test]
fn unknown_key_in_every_table_is_rejected_with_its_path() {
    fn tables(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        out.push(prefix.to_owned());
        for (k, v) in table {
            if let toml::Value::Table(t) = v {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                tables(&path, t, out);
            }
        }
    }
    let mut checked = 0;
    for file in shipped_files() {
        let text = std::fs::read_to_string(&file).expect("readable");
        let doc: toml::Table = text.parse().expect("shipped file is TOML");
        let mut paths = Vec::new();
        tables("", &doc, &mut paths);
        for table_path in paths {
            let mut doc = doc.clone();
            let mut node = &mut doc;
            for part in table_path.split('.').filter(|p| !p.is_empty()) {
                node = match part.split_once('[') {
                    None => node[part].as_table_mut().expect("table"),
                    Some((key, index)) => {
                        let i: usize = index.trim_end_matches(']').parse().expect("index");
                        node[key].as_array_mut().expect("array")[i]
                            .as_table_mut()
                            .expect("table")
                    }
                };
            }
            node.insert("no_such_key".into(), toml::Value::Integer(1));
            let text = toml::to_string(&doc).expect("serializable");
            let errors = parse_with_env(&text, "t.toml", NO_ENV).expect_err("unknown key accepted");
            let expected = if table_path.is_empty() {
                "no_such_key".to_owned()
            } else {
                format!("{table_path}.no_such_key")
            };
            assert_eq!(errors.0.len(), 1, "{}: {errors}", file.display());
            assert_eq!(errors.0[0].path, expected, "{}: {errors}", file.display());
            assert!(errors.0[0].message.contains("unknown key"), "{errors}");
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} tables checked");
}

#[test]
fn minimal_file_gets_documented_defaults() {
    let c = parse_with_env(MINIMAL, "t", NO_ENV).expect("valid");
    assert_eq!(c.admin.listen, model::DEFAULT_ADMIN_LISTEN.parse().unwrap());
    assert_eq!(c.log.level, model::DEFAULT_LOG_LEVEL);
    assert_eq!(c.log.format, model::LogFormat::Auto);
    assert_eq!(c.log.access_sample_ppm, 1_000_000);
    assert_eq!(c.shutdown.drain_timeout, model::DEFAULT_DRAIN_TIMEOUT);
    assert!(c.runtime.threads >= 1);
    assert_eq!(c.upstream, model::UpstreamConfig::default());
    assert_eq!(
        c.upstream.connect_timeout,
        upstream::DEFAULT_CONNECT_TIMEOUT
    );
    assert_eq!(c.upstream.max_attempts, 3);
    assert_eq!(c.upstream.outlier_detection.consecutive_failures, 5);
    assert!(
        !c.upstream.health_check.interval.is_zero(),
        "active checks are on by default"
    );
    assert_eq!(
        c.spiffe_id().as_str(),
        "spiffe://east.example.org/isthmus/gateway/gw-1"
    );
}

#[test]
fn env_overrides_nested_values() {
    let env = [
        (
            "ISTHMUS__GATEWAY__LOCALITY__ZONE".to_owned(),
            "us-east-1c".to_owned(),
        ),
        (
            "ISTHMUS__ADMIN__LISTEN".to_owned(),
            "127.0.0.1:9999".to_owned(),
        ),
        ("ISTHMUS__RUNTIME__THREADS".to_owned(), "3".to_owned()),
        // Not ours: ignored.
        ("ISTHMUSX__ADMIN__LISTEN".to_owned(), "garbage".to_owned()),
        ("PATH".to_owned(), "/bin".to_owned()),
    ];
    let c = parse_with_env(MINIMAL, "t", env).expect("valid");
    assert_eq!(c.gateway.locality.zone(), Some("us-east-1c"));
    assert_eq!(c.admin.listen.port(), 9999);
    assert_eq!(c.runtime.threads, 3);
}

#[test]
fn env_override_is_validated_like_the_file() {
    let env = [
        (
            "ISTHMUS__ADMIN__LISTEN".to_owned(),
            "not-an-address".to_owned(),
        ),
        ("ISTHMUS__ADMIN__BOGUS".to_owned(), "1".to_owned()),
    ];
    let errors = parse_with_env(MINIMAL, "t", env).expect_err("invalid");
    assert!(errors.mentions("admin.listen"), "{errors}");
    assert!(errors.mentions("admin.bogus"), "{errors}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
unknown_top = 1
[gateway]
name = "Bad_Name"
trust_domain = "spiffe://x"
extra = true
[gateway.locality]
zone = "z"
[admin]
listen = "nowhere"
[log]
level = "loud=="
format = "xml"
[runtime]
threads = 0
[shutdown]
drain_timeout = "forever"
"#;
    let errors = errors_of(text);
    for path in [
        "unknown_top",
        "gateway.name",
        "gateway.cluster",
        "gateway.trust_domain",
        "gateway.extra",
        "gateway.locality.region",
        "admin.listen",
        "log.level",
        "log.format",
        "runtime.threads",
        "shutdown.drain_timeout",
    ] {
        assert!(errors.mentions(path), "no error for {path} in:\n{errors}");
    }
    assert_eq!(errors.0.len(), 11, "{errors}");
    // Each line reads `dotted.path: what is wrong`.
    for line in errors.to_string().lines() {
        let (path, what) = line.split_once(": ").expect("path: message");
        assert!(!path.contains(' ') && !what.is_empty(), "{line}");
    }
}

#[test]
fn each_rule_has_a_failing_case() {
    assert_rejects("gateway", r#"name = "-gw""#, "gateway.name");
    assert_rejects(
        "gateway",
        &format!("name = \"{}\"", "a".repeat(64)),
        "gateway.name",
    );
    assert_rejects("gateway", r#"cluster = "East""#, "gateway.cluster");
    assert_rejects(
        "gateway",
        r#"trust_domain = "Example.org""#,
        "gateway.trust_domain",
    );
    assert_rejects("gateway", r#"trust_domain = """#, "gateway.trust_domain");
    assert_rejects(
        "gateway.locality",
        r#"region = "eu_west""#,
        "gateway.locality.region",
    );
    assert_rejects("gateway.locality", r#"zone = "Z""#, "gateway.locality.zone");
    assert_rejects(
        "gateway.locality",
        r#"subzone = "rack""#,
        "gateway.locality.subzone",
    );
    assert_rejects("admin", r#"listen = "localhost:15000""#, "admin.listen");
    assert_rejects("admin", r#"listen = "127.0.0.1""#, "admin.listen");
    assert_rejects("admin", "listen = 15000", "admin.listen");
    assert_rejects("log", r#"level = "info,=,""#, "log.level");
    assert_rejects("log", r#"format = "yaml""#, "log.format");
    assert_rejects("log", "access_sample = 1.5", "log.access_sample");
    assert_rejects("log", "access_sample = -0.1", "log.access_sample");
    assert_rejects("log", "access_sample = nan", "log.access_sample");
    assert_rejects("log", r#"access_sample = "10%""#, "log.access_sample");
    assert_rejects("runtime", "threads = 0", "runtime.threads");
    assert_rejects("runtime", "threads = 5000", "runtime.threads");
    assert_rejects("runtime", r#"threads = "many""#, "runtime.threads");
    assert_rejects(
        "shutdown",
        r#"drain_timeout = "10""#,
        "shutdown.drain_timeout",
    );
    assert_rejects(
        "shutdown",
        r#"drain_timeout = "2h""#,
        "shutdown.drain_timeout",
    );
    assert_rejects("gateway", "locality = 3", "gateway.locality");
}

#[test]
fn each_upstream_rule_has_a_failing_case() {
    assert_rejects(
        "upstream",
        r#"connect_timeout = "2""#,
        "upstream.connect_timeout",
    );
    assert_rejects(
        "upstream",
        r#"request_timeout = "0s""#,
        "upstream.request_timeout",
    );
    assert_rejects(
        "upstream",
        r#"idle_timeout = "2d""#,
        "upstream.idle_timeout",
    );
    assert_rejects("upstream", "max_attempts = 0", "upstream.max_attempts");
    assert_rejects("upstream", "max_attempts = 11", "upstream.max_attempts");
    assert_rejects(
        "upstream",
        "retry_budget_percent = 101",
        "upstream.retry_budget_percent",
    );
    assert_rejects(
        "upstream",
        "retry_min_per_second = -1",
        "upstream.retry_min_per_second",
    );
    assert_rejects(
        "upstream.circuit_breaker",
        "max_requests = 0",
        "upstream.circuit_breaker.max_requests",
    );
    assert_rejects(
        "upstream.circuit_breaker",
        "max_connections = -5",
        "upstream.circuit_breaker.max_connections",
    );
    assert_rejects(
        "upstream.circuit_breaker",
        r#"max_pending_requests = "many""#,
        "upstream.circuit_breaker.max_pending_requests",
    );
    assert_rejects(
        "upstream.outlier_detection",
        r#"base_ejection_time = "0s""#,
        "upstream.outlier_detection.base_ejection_time",
    );
    assert_rejects(
        "upstream.outlier_detection",
        r#"max_ejection_time = "1s""#,
        "upstream.outlier_detection.max_ejection_time",
    );
    assert_rejects(
        "upstream.outlier_detection",
        "max_ejection_percent = 150",
        "upstream.outlier_detection.max_ejection_percent",
    );
    assert_rejects(
        "upstream.outlier_detection",
        "consecutive_failures = -1",
        "upstream.outlier_detection.consecutive_failures",
    );
    assert_rejects(
        "upstream.health_check",
        r#"timeout = "0s""#,
        "upstream.health_check.timeout",
    );
    assert_rejects(
        "upstream.health_check",
        "unhealthy_threshold = 0",
        "upstream.health_check.unhealthy_threshold",
    );
    assert_rejects(
        "upstream.health_check",
        "healthy_threshold = 1000",
        "upstream.health_check.healthy_threshold",
    );
    let off = with("upstream.health_check", r#"interval = "0s""#);
    let c = parse_with_env(&off, "t", NO_ENV).expect("0s turns active checks off");
    assert!(c.upstream.health_check.interval.is_zero());
}

#[test]
fn missing_required_fields_are_named() {
    let errors = errors_of("");
    for path in [
        "gateway.name",
        "gateway.cluster",
        "gateway.trust_domain",
        "gateway.locality.region",
    ] {
        assert!(errors.mentions(path), "{errors}");
    }
}

#[test]
fn syntax_errors_name_the_file() {
    let errors = errors_of("[gateway\nname=");
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.0[0].path, "test.toml");
    assert!(errors.0[0].message.contains("TOML"), "{errors}");
    assert_eq!(
        errors.to_string().lines().count(),
        1,
        "one line per problem: {errors}"
    );
}

#[test]
fn unreadable_file_is_a_config_error() {
    let errors = load_with_env(Path::new("/nonexistent/isthmus.toml"), NO_ENV).unwrap_err();
    assert_eq!(errors.0[0].path, "/nonexistent/isthmus.toml");
    assert!(errors.0[0].message.contains("cannot be read"));
}

#[test]
fn effective_config_round_trips_through_toml() {
    let c = parse_with_env(
        &with("shutdown", r#"drain_timeout = "1m 30s""#),
        "t",
        NO_ENV,
    )
    .unwrap();
    assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(90));
    let printed = toml::to_string(&c).expect("serializable");
    let again = parse_with_env(&printed, "printed", NO_ENV).expect("printed config is valid");
    assert_eq!(c, again);
}

#[test]
fn a_table_of_the_wrong_type_is_one_error() {
    let errors = errors_of(&with("gateway", "locality = 3"));
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(
        errors.0[0].to_string(),
        "gateway.locality: invalid type: integer `3`, expected a table"
    );
}

const WITH_TRUST: &str = concat!(
    minimal!(),
    r#"[identity]
cert = "tls/svid.crt"
key = "tls/svid.key"
bundle = "/etc/isthmus/tls/bundle.pem"
[trust]
allow_ids = ["spiffe://west.example.org/isthmus/gateway/gw-w"]
allow_trust_domains = ["web.example.org"]
refresh_interval = "1m"
[[trust.federated]]
trust_domain = "west.example.org"
bundle = "west-bootstrap.pem"
endpoint_url = "https://127.0.0.1:15013/"
endpoint_spiffe_id = "spiffe://west.example.org/isthmus/gateway/gw-w"
[[trust.federated]]
trust_domain = "web.example.org"
endpoint_url = "https://bundles.example.org/web"
endpoint_profile = "https_web"
endpoint_ca = "web-roots.pem"
[[trust.federated]]
trust_domain = "static.example.org"
bundle = "static.json"
[trust.bundle_endpoint]
listen = "127.0.0.1:15013"
refresh_hint = "30s"
"#
);

#[test]
fn identity_and_trust_sections_parse_into_typed_values() {
    let c = parse_with_env(WITH_TRUST, "t", NO_ENV).expect("valid");
    let identity = c.identity.as_ref().expect("identity");
    assert_eq!(identity.cert, Path::new("tls/svid.crt"));
    assert_eq!(c.trust.refresh_interval, Duration::from_secs(60));
    assert_eq!(c.trust.federated.len(), 3);
    let west = &c.trust.federated[0];
    assert!(matches!(
        &west.endpoint.as_ref().unwrap().profile,
        model::EndpointProfileConfig::HttpsSpiffe { endpoint_spiffe_id }
            if endpoint_spiffe_id.as_str() == "spiffe://west.example.org/isthmus/gateway/gw-w"
    ));
    assert!(c.trust.federated[2].endpoint.is_none());
    let endpoint = c.trust.bundle_endpoint.as_ref().unwrap();
    assert_eq!(endpoint.refresh_hint, Duration::from_secs(30));
    // Round trip through print-config's TOML.
    let again = parse_with_env(&toml::to_string(&c).unwrap(), "printed", NO_ENV).unwrap();
    assert_eq!(c, again);
}

#[test]
fn relative_paths_are_resolved_against_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("isthmus.toml");
    std::fs::write(&file, WITH_TRUST).unwrap();
    let c = load_with_env(&file, NO_ENV).unwrap();
    let base = dir.path().canonicalize().unwrap();
    let identity = c.identity.unwrap();
    assert_eq!(identity.cert, base.join("tls/svid.crt"));
    assert_eq!(identity.bundle, Path::new("/etc/isthmus/tls/bundle.pem"));
    assert_eq!(
        c.trust.federated[0].bundle.as_deref(),
        Some(base.join("west-bootstrap.pem").as_path())
    );
}

/// `base` with `from` (which it must contain) replaced by `to`; must be
/// rejected at `path`.
fn assert_replaced_rejects(base: &str, from: &str, to: &str, path: &str) {
    assert!(base.contains(from), "{from}");
    let errors = errors_of(&base.replacen(from, to, 1));
    assert!(
        errors.mentions(path),
        "expected {path} for {to:?}, got:\n{errors}"
    );
}

/// `WITH_TRUST` with `from` replaced by `to`; must be rejected at `path`.
fn assert_trust_rejects(from: &str, to: &str, path: &str) {
    assert_replaced_rejects(WITH_TRUST, from, to, path);
}

#[test]
fn each_trust_rule_has_a_failing_case() {
    assert_trust_rejects("cert = \"tls/svid.crt\"\n", "", "identity.cert");
    assert_trust_rejects("key = \"tls/svid.key\"", "key = \" \"", "identity.key");
    assert_trust_rejects(
        "bundle = \"/etc/isthmus/tls/bundle.pem\"\n",
        "",
        "identity.bundle",
    );
    assert_trust_rejects(
        "spiffe://west.example.org/isthmus/gateway/gw-w\"]",
        "west\"]",
        "trust.allow_ids[0]",
    );
    assert_trust_rejects(
        "[\"web.example.org\"]",
        "[\"Web\"]",
        "trust.allow_trust_domains[0]",
    );
    assert_trust_rejects(
        "[\"web.example.org\"]",
        "[\"nobundle.example.org\"]",
        "trust.allow_trust_domains[0]",
    );
    assert_trust_rejects(
        "spiffe://west.example.org/isthmus/gateway/gw-w\"]",
        "spiffe://x.org/gw\"]",
        "trust.allow_ids[0]",
    );
    assert_trust_rejects(
        "refresh_interval = \"1m\"",
        "refresh_interval = \"100ms\"",
        "trust.refresh_interval",
    );
    assert_trust_rejects(
        "refresh_interval = \"1m\"",
        "refresh_interval = \"2d\"",
        "trust.refresh_interval",
    );
    assert_trust_rejects(
        "trust_domain = \"west.example.org\"",
        "trust_domain = \"east.example.org\"",
        "trust.federated[0].trust_domain",
    );
    assert_trust_rejects(
        "trust_domain = \"static.example.org\"",
        "trust_domain = \"west.example.org\"",
        "trust.federated[2].trust_domain",
    );
    assert_trust_rejects(
        "trust_domain = \"west.example.org\"\n",
        "",
        "trust.federated[0].trust_domain",
    );
    assert_trust_rejects(
        "bundle = \"west-bootstrap.pem\"\n",
        "",
        "trust.federated[0].bundle",
    );
    assert_trust_rejects("bundle = \"static.json\"", "", "trust.federated[2].bundle");
    assert_trust_rejects(
        "https://127.0.0.1:15013/",
        "http://127.0.0.1:15013/",
        "trust.federated[0].endpoint_url",
    );
    assert_trust_rejects(
        "https://127.0.0.1:15013/",
        "not a url",
        "trust.federated[0].endpoint_url",
    );
    assert_trust_rejects(
        "endpoint_spiffe_id = \"spiffe://west.example.org/isthmus/gateway/gw-w\"\n",
        "",
        "trust.federated[0].endpoint_spiffe_id",
    );
    assert_trust_rejects(
        "endpoint_spiffe_id = \"spiffe://west.example.org/isthmus/gateway/gw-w\"\n",
        "endpoint_spiffe_id = \"spiffe://other.org/gw\"\n",
        "trust.federated[0].endpoint_spiffe_id",
    );
    assert_trust_rejects(
        "endpoint_profile = \"https_web\"",
        "endpoint_profile = \"ftp\"",
        "trust.federated[1].endpoint_profile",
    );
    assert_trust_rejects(
        "endpoint_profile = \"https_web\"",
        "endpoint_profile = \"https_spiffe\"",
        "trust.federated[1].endpoint_ca",
    );
    assert_trust_rejects(
        "bundle = \"static.json\"",
        "bundle = \"static.json\"\nendpoint_profile = \"https_web\"",
        "trust.federated[2].endpoint_profile",
    );
    assert_trust_rejects(
        "listen = \"127.0.0.1:15013\"",
        "listen = \"127.0.0.1:15000\"",
        "trust.bundle_endpoint.listen",
    );
    assert_trust_rejects(
        "listen = \"127.0.0.1:15013\"",
        "",
        "trust.bundle_endpoint.listen",
    );
    assert_trust_rejects(
        "refresh_hint = \"30s\"",
        "refresh_hint = \"0s\"",
        "trust.bundle_endpoint.refresh_hint",
    );
    assert_trust_rejects(
        "[[trust.federated]]\ntrust_domain = \"static.example.org\"",
        "[[trust.federated]]\nbogus = 1\ntrust_domain = \"static.example.org\"",
        "trust.federated[2].bogus",
    );
}

#[test]
fn trust_without_identity_is_rejected() {
    let text = WITH_TRUST.replace("[identity]", "[not_identity]");
    let start = text.find("[not_identity]").unwrap();
    let end = text.find("[trust]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let errors = errors_of(&text);
    for path in [
        "trust.federated",
        "trust.bundle_endpoint",
        "trust.allow_ids",
        "trust.allow_trust_domains",
    ] {
        assert!(errors.mentions(path), "{path}: {errors}");
    }
}

const WITH_DATA_PLANE: &str = concat!(
    with_west!(),
    r#"[listeners]
outbound = "127.0.0.1:15001"
east_west = "127.0.0.1:15443"
[[services]]
namespace = "shop"
name = "web"
ports = [{ port = 8080 }, { port = 9090, protocol = "grpc" }]
endpoints = ["127.0.0.1:9001", "127.0.0.1:9002"]
export = true
[[services]]
namespace = "shop"
name = "cart"
ports = [{ port = 80 }]
[[peers]]
cluster = "west"
spiffe_id = "spiffe://west.example.org/isthmus/gateway/gw-w"
address = "127.0.0.1:25443"
locality = "eu-west/eu-west-1a"
services = ["shop/cart", "shop/web"]
"#
);

#[test]
fn data_plane_sections_build_the_static_catalog() {
    let c = parse_with_env(WITH_DATA_PLANE, "t", NO_ENV).expect("valid");
    assert_eq!(c.listeners.outbound.unwrap().port(), 15001);
    let peers = c.static_peers();
    let catalog = isthmus_federation::catalog::merge(
        &c.gateway.cluster,
        &c.local_services(),
        &peers.iter().collect::<Vec<_>>(),
    );
    let web = catalog.get(&"shop/web".parse().unwrap()).unwrap();
    assert_eq!(web.endpoints.len(), 2);
    assert_eq!(
        web.ports[1].protocol,
        isthmus_federation::catalog::Protocol::Grpc
    );
    assert!(web.exported);
    let cart = catalog.get(&"shop/cart".parse().unwrap()).unwrap();
    assert!(cart.endpoints.is_empty() && !cart.exported);
    assert!(
        web.allowed_callers.is_none(),
        "no allow lists: every admitted peer"
    );
    assert_eq!(cart.remote.len(), 1);
    assert_eq!(cart.remote[0].locality.to_string(), "eu-west/eu-west-1a");
    let again = parse_with_env(&toml::to_string(&c).unwrap(), "printed", NO_ENV).unwrap();
    assert_eq!(c, again);
}

fn assert_data_plane_rejects(from: &str, to: &str, path: &str) {
    assert_replaced_rejects(WITH_DATA_PLANE, from, to, path);
}

#[test]
fn each_data_plane_rule_has_a_failing_case() {
    assert_data_plane_rejects(
        "outbound = \"127.0.0.1:15001\"",
        "outbound = \"x\"",
        "listeners.outbound",
    );
    assert_data_plane_rejects(
        "outbound = \"127.0.0.1:15001\"",
        "outbound = \"127.0.0.1:15443\"",
        "listeners.east_west",
    );
    assert_data_plane_rejects(
        "outbound = \"127.0.0.1:15001\"",
        "outbound = \"127.0.0.1:15000\"",
        "listeners.outbound",
    );
    assert_data_plane_rejects(
        "namespace = \"shop\"\nname = \"web\"",
        "namespace = \"Shop\"\nname = \"web\"",
        "services[0].namespace",
    );
    assert_data_plane_rejects("name = \"web\"", "name = \"cart\"", "services[1].name");
    assert_data_plane_rejects(
        "{ port = 8080 }",
        "{ port = 0 }",
        "services[0].ports[0].port",
    );
    assert_data_plane_rejects(
        "{ port = 8080 }",
        "{ port = 9090 }",
        "services[0].ports[1].port",
    );
    assert_data_plane_rejects(
        "protocol = \"grpc\"",
        "protocol = \"udp\"",
        "services[0].ports[1].protocol",
    );
    assert_data_plane_rejects("ports = [{ port = 80 }]", "ports = []", "services[1].ports");
    assert_data_plane_rejects(
        "\"127.0.0.1:9002\"",
        "\"somewhere\"",
        "services[0].endpoints[1]",
    );
    assert_data_plane_rejects(
        "export = true",
        "export = true\nallow_ids = [\"gw-a\"]",
        "services[0].allow_ids[0]",
    );
    assert_data_plane_rejects(
        "export = true",
        "export = true\nallow_trust_domains = [\"A\"]",
        "services[0].allow_trust_domains[0]",
    );
    assert_data_plane_rejects(
        "export = true",
        "export = true\nmode = \"tunnel\"",
        "services[0].mode",
    );
    assert_data_plane_rejects(
        "export = true",
        "export = true\nmode = \"passthrough\"\nallow_trust_domains = [\"west.example.org\"]",
        "services[0].mode",
    );
    assert_data_plane_rejects(
        "{ port = 8080 }",
        "{ port = 8080, listen = \"127.0.0.1:7000\" }",
        "services[0].ports[0].listen",
    );
    assert_data_plane_rejects(
        "ports = [{ port = 80 }]",
        "ports = [{ port = 80, protocol = \"tcp\", listen = \"x\" }]",
        "services[1].ports[0].listen",
    );
    assert_data_plane_rejects(
        "ports = [{ port = 80 }]",
        "ports = [{ port = 80, protocol = \"tcp\", listen = \"127.0.0.1:15001\" }]",
        "services[1].ports[0].listen",
    );
    assert_data_plane_rejects(
        "cluster = \"west\"",
        "cluster = \"West\"",
        "peers[0].cluster",
    );
    assert_data_plane_rejects("gw-w\"\naddress", "gw-w/\"\naddress", "peers[0].spiffe_id");
    assert_data_plane_rejects(
        "spiffe://west.example.org/isthmus/gateway/gw-w\"\naddress",
        "spiffe://north.example.org/isthmus/gateway/gw-w\"\naddress",
        "peers[0].spiffe_id",
    );
    assert_data_plane_rejects(
        "address = \"127.0.0.1:25443\"",
        "address = \"west:1\"",
        "peers[0].address",
    );
    assert_data_plane_rejects(
        "locality = \"eu-west/eu-west-1a\"",
        "locality = \"a/b/c/d\"",
        "peers[0].locality",
    );
    assert_data_plane_rejects(
        "\"shop/cart\", \"shop/web\"",
        "\"shop/cart\", \"shop/nope\"",
        "peers[0].services[1]",
    );
    assert_data_plane_rejects(
        "\"shop/cart\", \"shop/web\"",
        "\"cart\"",
        "peers[0].services[0]",
    );
    assert_data_plane_rejects(
        "[[services]]\nnamespace = \"shop\"\nname = \"web\"",
        "[[services]]\nnamespace = \"shop\"\nname = \"web\"\nweight = 1",
        "services[0].weight",
    );
    // The east-west listener needs an identity.
    let no_identity = WITH_DATA_PLANE
        .replace(
            "[identity]\ncert = \"svid.crt\"\nkey = \"svid.key\"\nbundle = \"bundle.pem\"\n",
            "",
        )
        .replace(
            "[[trust.federated]]\ntrust_domain = \"west.example.org\"\nbundle = \"west.pem\"\n",
            "",
        );
    assert!(errors_of(&no_identity).mentions("listeners.east_west"));
}

const WITH_FEDERATION: &str = concat!(
    with_west!(),
    r#"[[trust.federated]]
trust_domain = "vms.example.org"
bundle = "vms.pem"
accept_peer_bundles = true
[listeners]
east_west = "127.0.0.1:15443"
[federation]
listen = "127.0.0.1:15012"
lease = "5s"
grace = "1m"
export = ["shop/*"]
state_file = "/var/lib/isthmus/federation-state.json"
[[federation.peers]]
address = "127.0.0.1:25012"
spiffe_id = "spiffe://west.example.org/isthmus/gateway/gw-w"
clusters = ["west"]
localities = ["eu-west"]
import = ["shop/*", "payments/api"]
export = ["shop/web", "*/api"]
[[federation.accept]]
trust_domain = "vms.example.org"
clusters = ["vm-eu", "vm-us"]
[federation.limits]
max_services_per_peer = 500
peer_retention = "10m"
"#
);

#[test]
fn federation_section_parses_with_defaults_and_round_trips() {
    let c = parse_with_env(WITH_FEDERATION, "t", NO_ENV).expect("valid");
    let f = &c.federation;
    assert!(f.enabled());
    assert_eq!(
        f.advertise,
        Some("127.0.0.1:15443".parse().unwrap()),
        "east_west by default"
    );
    assert_eq!(f.lease, Duration::from_secs(5));
    assert_eq!(f.weight, 1, "one replica's share by default");
    assert_eq!(f.grace, Duration::from_secs(60));
    assert_eq!(f.peers[0].grant.export.as_deref().unwrap().len(), 2);
    assert_eq!(f.peers[0].grant.clusters, ["west".parse().unwrap()]);
    assert_eq!(f.accept[0].grant.clusters.len(), 2);
    assert_eq!(f.limits.max_services_per_peer, 500);
    assert_eq!(f.limits.peer_retention, Duration::from_secs(600));
    assert_eq!(
        f.limits.max_ports_per_service,
        PeeringLimits::default().max_ports_per_service,
        "unset limits take their defaults"
    );
    let authority = f.authority(&c.trust);
    let west: isthmus_federation::SpiffeId = "spiffe://west.example.org/isthmus/gateway/gw-w"
        .parse()
        .unwrap();
    let grant = authority.grant(&west).expect("a configured peer");
    assert!(grant.imports.allows(&"payments/api".parse().unwrap()));
    assert!(!grant.imports.allows(&"payments/db".parse().unwrap()));
    let vm: isthmus_federation::SpiffeId = "spiffe://vms.example.org/isthmus/gateway/edge-1"
        .parse()
        .unwrap();
    assert!(authority.grant(&vm).is_some());
    assert!(!authority.is_configured(&vm));
    let vm_workload: isthmus_federation::SpiffeId =
        "spiffe://vms.example.org/ns/web/sa/web".parse().unwrap();
    assert!(!authority.listener_policy().allows(&vm_workload));
    assert_eq!(
        authority
            .bundle_pushes
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>(),
        ["vms.example.org"],
        "pushes only where opted in"
    );
    let again = parse_with_env(&toml::to_string(&c).unwrap(), "printed", NO_ENV).unwrap();
    assert_eq!(c, again);
    let off = parse_with_env(MINIMAL, "t", NO_ENV).unwrap();
    assert!(!off.federation.enabled());
}

#[test]
fn federation_mistakes_are_named() {
    for (from, to, path) in [
        ("lease = \"5s\"", "lease = \"1ms\"", "federation.lease"),
        ("lease = \"5s\"", "lease = \"1h\"", "federation.lease"),
        ("grace = \"1m\"", "grace = \"forever\"", "federation.grace"),
        (
            "export = [\"shop/*\"]",
            "export = [\"shop\"]",
            "federation.export[0]",
        ),
        ("\"*/api\"]", "\"*/API\"]", "federation.peers[0].export[1]"),
        (
            "address = \"127.0.0.1:25012\"",
            "address = \"nowhere\"",
            "federation.peers[0].address",
        ),
        (
            "gateway/gw-w\"\nclusters",
            "gateway/gw-w\"\nclusters = [\"west\"]\n[[federation.peers]]\naddress = \"127.0.0.1:1\"\nspiffe_id = \"spiffe://west.example.org/isthmus/gateway/gw-w\"\nclusters",
            "federation.peers[1].spiffe_id",
        ),
        (
            "spiffe://west.example.org/isthmus/gateway/gw-w",
            "spiffe://north.example.org/isthmus/gateway/gw-n",
            "federation.peers[0].spiffe_id",
        ),
        (
            "east_west = \"127.0.0.1:15443\"",
            "east_west = \"0.0.0.0:15443\"",
            "federation.advertise",
        ),
        (
            "listen = \"127.0.0.1:15012\"",
            "listen = \"127.0.0.1:15443\"",
            "federation.listen",
        ),
        ("lease = \"5s\"", "weight = 0", "federation.weight"),
        ("lease = \"5s\"", "weight = 10001", "federation.weight"),
        (
            "clusters = [\"west\"]\n",
            "",
            "federation.peers[0].clusters",
        ),
        (
            "clusters = [\"west\"]",
            "clusters = [\"West!\"]",
            "federation.peers[0].clusters[0]",
        ),
        (
            "import = [\"shop/*\", ",
            "import = [\"shop\", ",
            "federation.peers[0].import[0]",
        ),
        (
            "gateway/gw-w\"",
            "ns/shop/sa/web\"",
            "federation.peers[0].spiffe_id",
        ),
        (
            "trust_domain = \"vms.example.org\"\nclusters",
            "trust_domain = \"other.example.org\"\nclusters",
            "federation.accept[0].trust_domain",
        ),
        (
            "clusters = [\"vm-eu\", \"vm-us\"]",
            "clusters = []",
            "federation.accept[0].clusters",
        ),
        (
            "localities = [\"eu-west\"]",
            "localities = [\"eu west\"]",
            "federation.peers[0].localities[0]",
        ),
        (
            "max_services_per_peer = 500",
            "max_services_per_peer = 0",
            "federation.limits.max_services_per_peer",
        ),
        (
            "peer_retention = \"10m\"",
            "peer_retention = \"1y\"",
            "federation.limits.peer_retention",
        ),
        (
            "export = [\"shop/*\"]\n",
            "export = [\"shop/*\"]\naccept_peer_bundles = true\n",
            "federation.accept_peer_bundles",
        ),
        (
            "bundle = \"vms.pem\"\n",
            "bundle = \"vms.pem\"\nendpoint_url = \"https://vms.example.org/bundle\"\nendpoint_profile = \"https_web\"\n",
            "trust.federated[1].accept_peer_bundles",
        ),
    ] {
        assert_replaced_rejects(WITH_FEDERATION, from, to, path);
    }
    let no_identity = format!("{}[federation]\nlisten = \"127.0.0.1:15012\"\n", MINIMAL);
    assert!(errors_of(&no_identity).mentions("federation.listen"));
}

const WITH_DNS: &str = concat!(
    minimal!(),
    r#"
[listeners]
outbound = "127.0.0.1:15001"
[dns]
listen = "127.0.0.1:15053"
ttl = "10s"
clusterset_ipv4_range = "127.240.0.0/16"
clusterset_ipv6_range = "fd00:69::/112"
state_file = "/var/lib/isthmus/clusterset-ips.json"
upstreams = ["10.0.0.2", "10.0.0.3:5353"]
forward_timeout = "1s"
cache_size = 500
allow_sources = ["127.0.0.1", "10.0.0.0/8", "fd00::/8"]
rate_limit = 50
rate_limit_burst = 100
rate_limit_slip = 3
tcp_max_connections = 100
tcp_max_connections_per_source = 4
tcp_idle_timeout = "5s"
"#
);

#[test]
fn dns_section_parses_with_defaults_and_round_trips() {
    let c = parse_with_env(WITH_DNS, "t", NO_ENV).expect("valid");
    let d = &c.dns;
    assert_eq!(d.listen, Some("127.0.0.1:15053".parse().unwrap()));
    assert_eq!(d.ttl, Duration::from_secs(10));
    assert_eq!(
        d.upstreams,
        [
            "10.0.0.2:53".parse().unwrap(),
            "10.0.0.3:5353".parse().unwrap()
        ],
        "a bare address means port 53"
    );
    assert!(d.clusterset_listeners);
    assert_eq!(d.forward().unwrap().cache_size, 500);
    let again = parse_with_env(&toml::to_string(&c).unwrap(), "printed", NO_ENV).unwrap();
    assert_eq!(c, again);
    let off = parse_with_env(MINIMAL, "t", NO_ENV).unwrap();
    assert_eq!(off.dns.listen, None);
    assert_eq!(off.dns.ttl, Duration::from_secs(5));
    assert_eq!(off.dns.clusterset_ipv4_range.to_string(), "127.240.0.0/16");
    assert!(off.dns.forward().is_none(), "no upstreams: REFUSED");
    // The protection settings, explicit ...
    let p = d.policy();
    let allow: Vec<String> = d.allow_sources.iter().map(ToString::to_string).collect();
    assert_eq!(allow, ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]);
    assert!(p.allow_sources.allows("10.9.9.9".parse().unwrap()));
    assert!(
        !p.allow_sources.allows("127.0.0.2".parse().unwrap()),
        "an explicit list replaces the default"
    );
    assert_eq!(
        (
            p.rate_limit.per_second,
            p.rate_limit.burst,
            p.rate_limit.slip
        ),
        (50, 100, 3)
    );
    assert_eq!((p.tcp.total, p.tcp.per_source), (100, 4));
    assert_eq!(p.tcp_idle_timeout, Duration::from_secs(5));
    // ... and by default the same as the server's own defaults.
    assert_eq!(
        off.dns.policy(),
        isthmus_federation::dns::DnsPolicy::default()
    );
    assert_eq!(off.dns.tcp_idle_timeout, dns::DEFAULT_TCP_IDLE_TIMEOUT);
}

#[test]
fn dns_mistakes_are_named() {
    for (from, to, path) in [
        (
            "listen = \"127.0.0.1:15053\"",
            "listen = \"53\"",
            "dns.listen",
        ),
        (
            "listen = \"127.0.0.1:15053\"",
            "listen = \"127.0.0.1:15001\"",
            "dns.listen",
        ),
        ("ttl = \"10s\"", "ttl = \"2h\"", "dns.ttl"),
        (
            "\"127.240.0.0/16\"",
            "\"127.240.0.1/16\"",
            "dns.clusterset_ipv4_range",
        ),
        (
            "\"127.240.0.0/16\"",
            "\"fd00::/64\"",
            "dns.clusterset_ipv4_range",
        ),
        (
            "\"127.240.0.0/16\"",
            "\"127.0.0.0/31\"",
            "dns.clusterset_ipv4_range",
        ),
        (
            "\"fd00:69::/112\"",
            "\"10.0.0.0/8\"",
            "dns.clusterset_ipv6_range",
        ),
        (
            "state_file = \"/var/lib/isthmus/clusterset-ips.json\"",
            "state_file = \"\"",
            "dns.state_file",
        ),
        (
            "\"10.0.0.3:5353\"",
            "\"resolver.local\"",
            "dns.upstreams[1]",
        ),
        (
            "\"10.0.0.3:5353\"",
            "\"127.0.0.1:15053\"",
            "dns.upstreams[1]",
        ),
        (
            "forward_timeout = \"1s\"",
            "forward_timeout = \"1ms\"",
            "dns.forward_timeout",
        ),
        ("cache_size = 500", "cache_size = 5000000", "dns.cache_size"),
        (
            "\"10.0.0.0/8\", \"fd00::/8\"",
            "\"10.0.0.1/8\"",
            "dns.allow_sources[1]",
        ),
        (
            "\"10.0.0.0/8\", \"fd00::/8\"",
            "\"localnets\"",
            "dns.allow_sources[1]",
        ),
        (
            "allow_sources = [\"127.0.0.1\", \"10.0.0.0/8\", \"fd00::/8\"]",
            "allow_sources = []",
            "dns.allow_sources",
        ),
        ("rate_limit = 50", "rate_limit = -1", "dns.rate_limit"),
        (
            "rate_limit_burst = 100",
            "rate_limit_burst = 0",
            "dns.rate_limit_burst",
        ),
        (
            "rate_limit_slip = 3",
            "rate_limit_slip = 11",
            "dns.rate_limit_slip",
        ),
        (
            "tcp_max_connections = 100",
            "tcp_max_connections = 0",
            "dns.tcp_max_connections",
        ),
        (
            "tcp_max_connections_per_source = 4",
            "tcp_max_connections_per_source = 101",
            "dns.tcp_max_connections_per_source",
        ),
        (
            "tcp_idle_timeout = \"5s\"",
            "tcp_idle_timeout = \"10m\"",
            "dns.tcp_idle_timeout",
        ),
        (
            "tcp_idle_timeout = \"5s\"",
            "tcp_idle_timeout = \"100ms\"",
            "dns.tcp_idle_timeout",
        ),
        (
            "outbound = \"127.0.0.1:15001\"",
            "outbound = \"127.240.0.9:15001\"",
            "listeners.outbound",
        ),
    ] {
        assert_replaced_rejects(WITH_DNS, from, to, path);
    }
}

/// [`WITH_DATA_PLANE`] with labelled endpoints, subsets, routes and a
/// locality policy.
fn with_traffic() -> String {
    WITH_DATA_PLANE
        .replacen(
            "trust_domain = \"east.example.org\"\n[gateway.locality]",
            "trust_domain = \"east.example.org\"\nlabels = { network = \"n1\" }\n[gateway.locality]",
            1,
        )
        .replacen(
            r#"endpoints = ["127.0.0.1:9001", "127.0.0.1:9002"]"#,
            r#"endpoints = [
  "127.0.0.1:9001",
  { address = "127.0.0.1:9002", locality = "us-east/us-east-1b", labels = { version = "v2" }, weight = 3 },
]
subsets = [{ name = "v2", labels = { version = "v2" } }]"#,
            1,
        )
        .replacen(
            "[[peers]]",
            r#"[[routes]]
service = "shop/web"
[[routes.rules]]
headers = [{ name = "X-Canary", exact = "true" }, { name = "x-debug", present = true }]
split = [{ subset = "v2", weight = 100 }]
[[routes.rules]]
split = [{ weight = 90 }, { subset = "v2", cluster = "west", weight = 10 }]
[upstream.locality]
failover_order = ["eu-west"]
failover_priority = ["network"]
overprovisioning_factor = 1.2
panic_threshold_percent = 0
slow_start_window = "30s"
[[peers]]"#,
            1,
        )
}

#[test]
fn traffic_keys_parse_into_the_catalog_and_round_trip() {
    use crate::config::traffic::HeaderValueMatch;
    let c = parse_with_env(&with_traffic(), "t", NO_ENV).expect("valid");
    let local = c.local_services();
    let web = local
        .iter()
        .find(|s| s.export.key.name.as_str() == "web")
        .unwrap();
    assert_eq!(web.endpoints.len(), 2);
    let info = &web.endpoint_info[&"127.0.0.1:9002".parse().unwrap()];
    assert_eq!(info.weight, 3);
    assert_eq!(
        info.locality.as_ref().unwrap().to_string(),
        "us-east/us-east-1b"
    );
    assert_eq!(info.labels["version"], "v2");
    assert!(
        !web.endpoint_info
            .contains_key(&"127.0.0.1:9001".parse().unwrap()),
        "a plain address has no details"
    );
    // Only the subsets with endpoints here are announced to peers.
    let exports = isthmus_federation::catalog::export_set(&local);
    assert_eq!(exports[&"shop/web".parse().unwrap()].subsets, ["v2"]);
    let route = &c.routes[0];
    assert_eq!(
        route.rules[0].headers[0].name, "x-canary",
        "names are lowercased"
    );
    assert_eq!(
        route.rules[0].headers[1].value,
        HeaderValueMatch::Present(true)
    );
    assert_eq!(
        route.rules[1].split[1].cluster.as_ref().unwrap().as_str(),
        "west"
    );
    assert_eq!(c.gateway.labels["network"], "n1");
    let l = &c.upstream.locality;
    assert_eq!(l.failover_order, ["eu-west"]);
    assert_eq!(l.failover_priority, ["network"]);
    assert_eq!(l.overprovisioning_percent, 120);
    assert_eq!(l.panic_threshold_percent, 0);
    assert_eq!(l.slow_start_window, Duration::from_secs(30));
    let again = parse_with_env(&toml::to_string(&c).unwrap(), "printed", NO_ENV).unwrap();
    assert_eq!(c, again, "the effective configuration parses back");
    // Defaults.
    let d = parse_with_env(WITH_DATA_PLANE, "t", NO_ENV)
        .unwrap()
        .upstream
        .locality;
    assert_eq!(
        (
            d.overprovisioning_percent,
            d.panic_threshold_percent,
            d.slow_start_window.as_secs()
        ),
        (140, 50, 10)
    );
}

#[test]
fn each_traffic_rule_has_a_failing_case() {
    let cases = [
        (
            r#"locality = "us-east/us-east-1b""#,
            r#"locality = "a/b/c/d""#,
            "services[0].endpoints[1].locality",
        ),
        (
            "weight = 3",
            "weight = 0",
            "services[0].endpoints[1].weight",
        ),
        (
            r#"{ address = "127.0.0.1:9002","#,
            r#"{ address = "nowhere","#,
            "services[0].endpoints[1].address",
        ),
        (
            r#"{ address = "127.0.0.1:9002","#,
            r#"{ adress = "127.0.0.1:9002","#,
            "services[0].endpoints[1].adress",
        ),
        (
            r#""127.0.0.1:9001","#,
            r#""127.0.0.1:9002","#,
            "services[0].endpoints[1]",
        ),
        (r#""127.0.0.1:9001","#, "7,", "services[0].endpoints[0]"),
        (
            r#"labels = { version = "v2" } }]"#,
            "labels = {} }]",
            "services[0].subsets[0].labels",
        ),
        (
            r#"subsets = [{ name = "v2""#,
            r#"subsets = [{ name = "V2""#,
            "services[0].subsets[0].name",
        ),
        (
            r#"service = "shop/web""#,
            r#"service = "web""#,
            "routes[0].service",
        ),
        (
            r#"name = "X-Canary""#,
            r#"name = "x canary""#,
            "routes[0].rules[0].headers[0].name",
        ),
        (
            r#"exact = "true""#,
            r#"exact = "true", prefix = "t""#,
            "routes[0].rules[0].headers[0]",
        ),
        (
            r#"split = [{ subset = "v2", weight = 100 }]"#,
            "split = []",
            "routes[0].rules[0].split",
        ),
        (
            r#"{ subset = "v2", weight = 100 }"#,
            r#"{ subset = "v3", weight = 100 }"#,
            "routes[0].rules[0].split[0].subset",
        ),
        (
            r#"{ subset = "v2", weight = 100 }"#,
            r#"{ subset = "v2", weight = 0 }"#,
            "routes[0].rules[0].split",
        ),
        (
            r#"cluster = "west""#,
            r#"cluster = "West""#,
            "routes[0].rules[1].split[1].cluster",
        ),
        (
            r#"{ weight = 90 }"#,
            r#"{ weight = -1 }"#,
            "routes[0].rules[1].split[0].weight",
        ),
        (
            r#"headers = [{ name = "X-Canary""#,
            r#"headers = [] # [{ name = "X-Canary""#,
            "routes[0].rules[1].headers",
        ),
        (
            r#"failover_order = ["eu-west"]"#,
            r#"failover_order = ["eu-west", "eu-west"]"#,
            "upstream.locality.failover_order[1]",
        ),
        (
            "overprovisioning_factor = 1.2",
            "overprovisioning_factor = 0.5",
            "upstream.locality.overprovisioning_factor",
        ),
        (
            "panic_threshold_percent = 0",
            "panic_threshold_percent = 101",
            "upstream.locality.panic_threshold_percent",
        ),
        (
            r#"slow_start_window = "30s""#,
            r#"slow_start_window = "soon""#,
            "upstream.locality.slow_start_window",
        ),
        (
            r#"failover_priority = ["network"]"#,
            r#"failover_priority = ["net work"]"#,
            "upstream.locality.failover_priority[0]",
        ),
        (
            r#"labels = { network = "n1" }"#,
            r#"labels = { "net work" = "n1" }"#,
            "gateway.labels.net work",
        ),
    ];
    let base = with_traffic();
    for (from, to, path) in cases {
        assert_replaced_rejects(&base, from, to, path);
    }
    // A second [[routes]] for the same service is refused.
    let twice = base.replacen("[upstream.locality]", "[[routes]]\nservice = \"shop/web\"\n[[routes.rules]]\nsplit = [{ weight = 1 }]\n[upstream.locality]", 1);
    assert!(errors_of(&twice).mentions("routes[1].service"));
}

#[test]
fn limits_have_production_defaults_and_round_trip() {
    use crate::config::limits::{DEFAULT_ADMIN, DEFAULT_HEADER_TIMEOUT, DEFAULT_OUTBOUND};
    let c = parse_with_env(MINIMAL, "t", NO_ENV).expect("valid");
    assert_eq!(c.limits.header_timeout, DEFAULT_HEADER_TIMEOUT);
    assert_eq!(c.limits.outbound, DEFAULT_OUTBOUND);
    assert_eq!(c.limits.admin, DEFAULT_ADMIN);
    assert_eq!(c.limits.h2_max_concurrent_streams, 100);
    assert_eq!(c.limits.max_request_header_bytes, 64 * 1024);
    let text = with("limits", "header_timeout = \"3s\"").replace(
        "[limits]\n",
        "[limits]\nmax_request_header_bytes = 262144\n",
    );
    let text = text
        + "\n[limits.east_west]\nconnections = 50\nconnections_per_source = 5\nhandshakes = 8\nhandshakes_per_source = 2\n[limits.admin]\nconnections_per_source = 3\n";
    let c = parse_with_env(&text, "t", NO_ENV).expect("valid");
    assert_eq!(c.limits.header_timeout, Duration::from_secs(3));
    assert_eq!(c.limits.max_request_header_bytes, 262_144);
    assert_eq!(
        (c.limits.east_west.total, c.limits.east_west.per_source),
        (50, 5)
    );
    assert_eq!(
        (
            c.limits.east_west_handshakes.total,
            c.limits.east_west_handshakes.per_source
        ),
        (8, 2)
    );
    assert_eq!(
        (c.limits.admin.total, c.limits.admin.per_source),
        (DEFAULT_ADMIN.total, 3),
        "an unset key keeps its default"
    );
    let again = parse_with_env(&toml::to_string(&c).unwrap(), "printed", NO_ENV).unwrap();
    assert_eq!(c, again);
}

#[test]
fn limits_mistakes_are_named() {
    assert_rejects(
        "limits",
        "header_timeout = \"100ms\"",
        "limits.header_timeout",
    );
    assert_rejects("limits", "header_timeout = \"1h\"", "limits.header_timeout");
    assert_rejects(
        "limits",
        "header_timeout = \"soon\"",
        "limits.header_timeout",
    );
    assert_rejects(
        "limits",
        "h2_max_concurrent_streams = 0",
        "limits.h2_max_concurrent_streams",
    );
    // Pingora's HTTP/1 ceiling is 1 MiB less a byte; under 4 KiB, ordinary
    // browser requests would fail.
    for bytes in ["1048576", "1024"] {
        assert_rejects(
            "limits",
            &format!("max_request_header_bytes = {bytes}"),
            "limits.max_request_header_bytes",
        );
    }
    assert_rejects(
        "limits.outbound",
        "connections = 0",
        "limits.outbound.connections",
    );
    assert_rejects(
        "limits.admin",
        "connections_per_source = 1000",
        "limits.admin.connections_per_source",
    );
    assert_rejects(
        "limits.east_west",
        "handshakes_per_source = 5000",
        "limits.east_west.handshakes_per_source",
    );
    assert_rejects(
        "limits.bundle_endpoint",
        "handshakes = 5",
        "limits.bundle_endpoint.handshakes",
    );
}

#[test]
fn passthrough_services_take_source_networks() {
    let service = |extra: &str| {
        format!(
            "{MINIMAL}\n[[services]]\nnamespace = \"shop\"\nname = \"db\"\nports = [{{ port = 5432, protocol = \"tcp\" }}]\nexport = true\n{extra}\n"
        )
    };
    let c = parse_with_env(
        &service("mode = \"passthrough\"\nallow_sources = [\"10.1.0.0/16\", \"192.0.2.7\", \"fd00::/8\"]"),
        "t",
        NO_ENV,
    )
    .expect("valid");
    let db = &c.services[0];
    assert!(db.admits_source("10.1.200.3".parse().unwrap()));
    assert!(db.admits_source("192.0.2.7".parse().unwrap()));
    assert!(
        db.admits_source("::ffff:10.1.0.1".parse().unwrap()),
        "IPv4-mapped"
    );
    assert!(db.admits_source("fd12::1".parse().unwrap()));
    assert!(!db.admits_source("10.2.0.1".parse().unwrap()));
    assert!(!db.admits_source("192.0.2.8".parse().unwrap()));
    let again = parse_with_env(&toml::to_string(&c).unwrap(), "printed", NO_ENV).unwrap();
    assert_eq!(c, again);
    let open = parse_with_env(&service("mode = \"passthrough\""), "t", NO_ENV).unwrap();
    assert!(
        open.services[0].admits_source("203.0.113.9".parse().unwrap()),
        "no allow_sources: any source"
    );
    for (extra, path) in [
        (
            "mode = \"passthrough\"\nallow_sources = [\"10.0.0.0/33\"]",
            "services[0].allow_sources[0]",
        ),
        (
            "mode = \"passthrough\"\nallow_sources = []",
            "services[0].allow_sources",
        ),
        (
            "allow_sources = [\"10.0.0.0/8\"]",
            "services[0].allow_sources",
        ),
    ] {
        let errors = errors_of(&service(extra));
        assert!(errors.mentions(path), "{extra}: {errors}");
    }
}

/// Sections import the shared parsers (and errors), never each other: model.rs
/// composes them, so no circle comes back. `[[discovery.dns]]` entries and
/// watched files are `[[services]]` entries, so discovery alone builds on
/// services.
#[test]
fn sections_import_only_the_shared_parsers() {
    let sections = [
        ("admin", include_str!("admin.rs")),
        ("discovery", include_str!("discovery.rs")),
        ("dns", include_str!("dns.rs")),
        ("federation", include_str!("federation.rs")),
        ("gateway", include_str!("gateway.rs")),
        ("identity", include_str!("identity.rs")),
        ("limits", include_str!("limits.rs")),
        ("listeners", include_str!("listeners.rs")),
        ("log", include_str!("log.rs")),
        ("peers", include_str!("peers.rs")),
        ("routes", include_str!("routes.rs")),
        ("runtime", include_str!("runtime.rs")),
        ("services", include_str!("services.rs")),
        ("shutdown", include_str!("shutdown.rs")),
        ("trust", include_str!("trust.rs")),
        ("upstream", include_str!("upstream.rs")),
    ];
    for (name, text) in sections {
        let code = text.lines().filter(|l| !l.trim_start().starts_with("//"));
        for line in code {
            for (_, rest) in line
                .match_indices("super::")
                .map(|(i, _)| line.split_at(i + 7))
            {
                let module: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let allowed = module == "parse"
                    || module == "error"
                    || (name == "discovery" && module == "services");
                assert!(allowed, "{name}.rs uses super::{module}: {line}");
            }
        }
    }
}

#[test]
fn tracing_is_on_with_an_endpoint_and_checked_key_by_key() {
    let c = parse_with_env(MINIMAL, "t", NO_ENV).unwrap();
    assert_eq!(c.tracing, None, "off without an endpoint");
    let on = with("tracing", r#"endpoint = "http://127.0.0.1:4317""#);
    let t = parse_with_env(&on, "t", NO_ENV).unwrap().tracing.unwrap();
    assert_eq!(t.protocol, model::OtlpProtocol::Grpc);
    assert_eq!(t.sample_ratio, tracing::DEFAULT_SAMPLE_RATIO);
    assert_eq!(t.batch_size, tracing::DEFAULT_BATCH_SIZE);
    assert_eq!(t.queue_size, tracing::DEFAULT_QUEUE_SIZE);
    assert_eq!(t.export_timeout, tracing::DEFAULT_EXPORT_TIMEOUT);
    let full = format!(
        "{on}protocol = \"http/protobuf\"\nsample_ratio = 0.25\nbatch_size = 8\nqueue_size = 64\n\
         export_timeout = \"2s\"\nheaders = {{ authorization = \"Bearer s3cret\" }}\n"
    );
    let t = parse_with_env(&full, "t", NO_ENV).unwrap().tracing.unwrap();
    assert_eq!(t.protocol, model::OtlpProtocol::HttpProtobuf);
    assert_eq!((t.sample_ratio, t.batch_size, t.queue_size), (0.25, 8, 64));
    assert_eq!(t.export_timeout, Duration::from_secs(2));
    assert_eq!(t.headers[0].1, "Bearer s3cret");
    // The effective configuration names the headers, never their values.
    let shown = serde_json::to_string(&t).unwrap();
    assert!(
        shown.contains("authorization") && !shown.contains("s3cret"),
        "{shown}"
    );

    for (line, path) in [
        (r#"endpoint = "127.0.0.1:4317""#, "tracing.endpoint"),
        (r#"endpoint = "https://collector:4317""#, "tracing.endpoint"),
        (r#"endpoint = "http://collector""#, "tracing.endpoint"),
        (r#"protocol = "http/json""#, "tracing.protocol"),
        ("sample_ratio = 1.5", "tracing.sample_ratio"),
        ("sample_ratio = -0.5", "tracing.sample_ratio"),
        ("batch_size = 0", "tracing.batch_size"),
        ("queue_size = 0", "tracing.queue_size"),
        ("queue_size = 100000000", "tracing.queue_size"),
        (r#"export_timeout = "5""#, "tracing.export_timeout"),
        (r#"export_timeout = "2h""#, "tracing.export_timeout"),
        (
            r#"headers = { "bad name" = "x" }"#,
            "tracing.headers.bad name",
        ),
        (
            r#"headers = { x-key = "line\nbreak" }"#,
            "tracing.headers.x-key",
        ),
    ] {
        assert_rejects("tracing", line, path);
    }
}
