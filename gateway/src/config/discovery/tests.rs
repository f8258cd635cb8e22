use std::time::Duration;

use super::*;
use crate::config::parse_with_env;

const NO_ENV: [(String, String); 0] = [];

const BASE: &str = r#"
[gateway]
name = "gw-1"
cluster = "east"
trust_domain = "east.example.org"
[gateway.locality]
region = "us-east"
"#;

fn parse(extra: &str) -> Result<crate::config::Config, ConfigErrors> {
    parse_with_env(&format!("{BASE}\n{extra}"), "test.toml", NO_ENV)
}

fn assert_rejects(extra: &str, path: &str) {
    let errors = parse(extra).expect_err("should be rejected");
    assert!(
        errors.mentions(path),
        "expected an error at {path} for:\n{extra}\ngot:\n{errors}"
    );
}

const FULL: &str = r#"
[discovery]
files = ["services.d/payments.toml"]
dns_resolvers = ["10.0.0.2", "127.0.0.1:5353"]
dns_min_ttl = "2s"
dns_max_ttl = "1m"
dns_timeout = "1s"

[[discovery.dns]]
namespace = "payments"
name = "ledger"
ports = [{ port = 8080, name = "http" }]
query = "_http._tcp.ledger.example.internal"
export = true

[[discovery.dns]]
namespace = "payments"
name = "audit"
ports = [{ port = 9000, protocol = "tcp" }]
query = "audit.example.internal"

[discovery.kubernetes]
kubeconfig = "/etc/isthmus/kubeconfig"
context = "east"
namespaces = ["payments", "shop"]
"#;

#[test]
fn a_full_section_parses_with_inferred_records_and_round_trips() {
    let config = parse(FULL).unwrap();
    let d = &config.discovery;
    assert_eq!(d.files, [PathBuf::from("services.d/payments.toml")]);
    assert_eq!(
        d.dns_resolvers,
        [
            "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        ]
    );
    assert_eq!(
        (d.dns_min_ttl, d.dns_max_ttl, d.dns_timeout),
        (
            Duration::from_secs(2),
            Duration::from_secs(60),
            Duration::from_secs(1)
        )
    );
    assert_eq!(d.dns[0].record, DnsRecordKind::Srv);
    assert_eq!(d.dns[0].query, "_http._tcp.ledger.example.internal.");
    assert_eq!(d.dns[0].port, None);
    // A/AAAA with one service port: that port.
    assert_eq!(d.dns[1].record, DnsRecordKind::A);
    assert_eq!(d.dns[1].port, Some(9000));
    let target = d.dns[1].target(&config.gateway.cluster);
    assert_eq!(target.records, DnsRecords::Ip { port: 9000 });
    assert!(!target.service.exported);
    let k = d.kubernetes.as_ref().unwrap();
    assert_eq!(k.namespaces.len(), 2);
    assert_eq!(
        d.kubernetes_settings(&config.gateway.cluster)
            .unwrap()
            .source_name(),
        "kubernetes:/etc/isthmus/kubeconfig"
    );

    // print-config's output is a valid configuration with the same meaning.
    let text = toml::to_string(&config).unwrap();
    let again = parse_with_env(&text, "printed.toml", NO_ENV).unwrap();
    assert_eq!(again.discovery, config.discovery);
}

#[test]
fn no_section_means_no_sources() {
    let config = parse("").unwrap();
    assert_eq!(config.discovery, DiscoveryConfig::default());
    assert!(
        config
            .discovery
            .kubernetes_settings(&config.gateway.cluster)
            .is_none()
    );
}

#[test]
fn each_discovery_rule_has_a_failing_case() {
    let dns = |body: &str| {
        format!(
            "[[discovery.dns]]\nnamespace = \"payments\"\nname = \"ledger\"\nports = [{{ port = 8080 }}]\n{body}\n"
        )
    };
    for (extra, path) in [
        ("[discovery]\nfiles = [\"\"]".to_owned(), "discovery.files[0]"),
        ("[discovery]\nfiles = [\"a.toml\", \"a.toml\"]".into(), "discovery.files[1]"),
        ("[discovery]\ndns_resolvers = [\"dns.example\"]".into(), "discovery.dns_resolvers[0]"),
        ("[discovery]\ndns_min_ttl = \"100ms\"".into(), "discovery.dns_min_ttl"),
        ("[discovery]\ndns_max_ttl = \"2d\"".into(), "discovery.dns_max_ttl"),
        ("[discovery]\ndns_min_ttl = \"10m\"\ndns_max_ttl = \"1m\"".into(), "discovery.dns_max_ttl"),
        ("[discovery]\ndns_timeout = \"0s\"".into(), "discovery.dns_timeout"),
        ("[discovery]\ndns_timeout = \"soon\"".into(), "discovery.dns_timeout"),
        (dns(""), "discovery.dns[0].query"),
        (dns("query = \"a..b\""), "discovery.dns[0].query"),
        (dns("query = \"x.example\"\nrecord = \"mx\""), "discovery.dns[0].record"),
        (dns("query = \"_http._tcp.x.example\"\nport = 80"), "discovery.dns[0].port"),
        (dns("query = \"x.example\"\nport = 70000"), "discovery.dns[0].port"),
        (
            "[[discovery.dns]]\nnamespace = \"payments\"\nname = \"ledger\"\nports = [{ port = 1 }, { port = 2 }]\nquery = \"x.example\"".into(),
            "discovery.dns[0].port",
        ),
        (
            "[[discovery.dns]]\nnamespace = \"payments\"\nname = \"ledger\"\nports = [{ port = 1, protocol = \"tcp\", listen = \"127.0.0.1:7000\" }]\nquery = \"x.example\"".into(),
            "discovery.dns[0].ports[0].listen",
        ),
        (
            "[[discovery.dns]]\nnamespace = \"Payments\"\nname = \"ledger\"\nports = [{ port = 1 }]\nquery = \"x.example\"".into(),
            "discovery.dns[0].namespace",
        ),
        (
            "[[discovery.dns]]\nnamespace = \"payments\"\nname = \"ledger\"\nports = [{ port = 1, protocol = \"udp\" }]\nquery = \"x.example\"".into(),
            "discovery.dns[0].ports[0].protocol",
        ),
        (
            "[[discovery.dns]]\nnamespace = \"payments\"\nname = \"ledger\"\nquery = \"x.example\"".into(),
            "discovery.dns[0].ports",
        ),
        (format!("{}{}", dns("query = \"x.example\""), dns("query = \"y.example\"")), "discovery.dns[1].name"),
        (dns("query = \"x.example\"\nendpoints = [\"10.0.0.1:80\"]"), "discovery.dns[0].endpoints"),
        ("[discovery.kubernetes]\ncontext = \"east\"".into(), "discovery.kubernetes.context"),
        ("[discovery.kubernetes]\nkubeconfig = \"\"".into(), "discovery.kubernetes.kubeconfig"),
        ("[discovery.kubernetes]\nnamespaces = [\"Shop\"]".into(), "discovery.kubernetes.namespaces[0]"),
        ("[discovery.kubernetes]\nnamespaces = [\"shop\", \"shop\"]".into(), "discovery.kubernetes.namespaces[1]"),
        ("[discovery.kubernetes]\nwatch_all = true".into(), "discovery.kubernetes.watch_all"),
        ("[discovery]\nsources = 1".into(), "discovery.sources"),
    ] {
        assert_rejects(&extra, path);
    }
}

#[test]
fn relative_discovery_paths_follow_the_config_file() {
    let mut config = parse(FULL).unwrap();
    config.discovery.kubernetes.as_mut().unwrap().kubeconfig = Some("kube/config".into());
    config.resolve_paths(Path::new("/etc/isthmus"));
    assert_eq!(
        config.discovery.files,
        [PathBuf::from("/etc/isthmus/services.d/payments.toml")]
    );
    assert_eq!(
        config.discovery.kubernetes.unwrap().kubeconfig,
        Some(PathBuf::from("/etc/isthmus/kube/config"))
    );
}

#[test]
fn a_services_file_is_checked_like_the_services_section() {
    let good = r#"
[[services]]
namespace = "payments"
name = "ledger"
ports = [{ port = 8080 }]
endpoints = ["127.0.0.1:9001"]
export = true
"#;
    let services = parse_services_file(good, "f.toml").unwrap();
    assert_eq!(services.len(), 1);
    let local = services[0].local_service(&"east".parse().unwrap());
    assert!(local.exported);
    assert_eq!(local.endpoints, ["127.0.0.1:9001".parse().unwrap()]);
    assert!(parse_services_file("", "f.toml").unwrap().is_empty());

    let bad = r#"
[[services]]
namespace = "a"
name = "one"
ports = [{ port = 80 }]
[[services]]
namespace = "a"
name = "two"
ports = [{ port = 80, protocol = "tcp", listen = "127.0.0.1:7000" }]
[[services]]
namespace = "a"
name = "three"
ports = [{ port = 80 }]
endpoints = ["nowhere"]
"#;
    let errors = parse_services_file(bad, "f.toml").unwrap_err();
    assert!(errors.mentions("services[2].endpoints[0]"), "{errors}");
    assert!(errors.mentions("services[1].ports[0].listen"), "{errors}");
    assert_eq!(errors.0.len(), 2, "{errors}");

    let unknown =
        parse_services_file("[[services]]\nnamespace = \"a\"\nprot = 1\n", "f.toml").unwrap_err();
    assert!(unknown.mentions("services[0].prot"), "{unknown}");
    let other = parse_services_file("[gateway]\nname = \"x\"\n", "f.toml").unwrap_err();
    assert!(other.mentions("gateway"), "{other}");
    let syntax = parse_services_file("[[services]\n", "/etc/x.toml").unwrap_err();
    assert!(syntax.mentions("/etc/x.toml"), "{syntax}");
    assert!(syntax.to_string().contains("line 1"), "{syntax}");
}
