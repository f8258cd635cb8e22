//! `[discovery]`: where this cluster's services come from besides
//! `[[services]]`: watched files, DNS and Kubernetes
//! (see `isthmus_federation::discovery`).
//!
//! Also the parser of a watched file, a file of `[[services]]` tables checked
//! by exactly the rules of the main configuration's `[[services]]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use isthmus_federation::discovery::dns::{self, DnsRecords, DnsSettings, DnsTarget};
use isthmus_federation::discovery::kubernetes::KubernetesSettings;
use isthmus_federation::{ClusterName, Namespace};
use serde::{Deserialize, Serialize};

use super::error::{ConfigError, ConfigErrors};
use super::parse::{
    Check, Keyword, keyword, parse_duration, parse_duration_between, parse_path, parse_resolver,
    port, resolve_path, unique_list,
};
// `[[discovery.dns]]` entries and watched files hold `[[services]]` entries,
// checked by the same rules: the one section this one builds on.
use super::services::{EastWestMode, PortConfig, RawPort, RawService, ServiceConfig, services};

/// Default shortest time between two resolutions of a DNS-discovered name.
pub const DEFAULT_DNS_MIN_TTL: Duration = dns::DEFAULT_MIN_TTL;
/// Default longest time between two resolutions of a DNS-discovered name.
pub const DEFAULT_DNS_MAX_TTL: Duration = dns::DEFAULT_MAX_TTL;
/// Default time one DNS query may take.
pub const DEFAULT_DNS_TIMEOUT: Duration = dns::DEFAULT_TIMEOUT;
/// Bounds of `discovery.dns_min_ttl` and `discovery.dns_max_ttl`.
pub const DNS_TTL_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// Longest `discovery.dns_timeout`.
pub const MAX_DNS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a watched file's directory must be quiet before it is re-read.
pub const FILE_DEBOUNCE: Duration = Duration::from_millis(200);

/// `[discovery]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    /// `discovery.files`
    pub files: Option<Vec<String>>,
    /// `discovery.dns_resolvers`
    pub dns_resolvers: Option<Vec<String>>,
    /// `discovery.dns_min_ttl`
    pub dns_min_ttl: Option<String>,
    /// `discovery.dns_max_ttl`
    pub dns_max_ttl: Option<String>,
    /// `discovery.dns_timeout`
    pub dns_timeout: Option<String>,
    /// `[[discovery.dns]]`
    pub dns: Option<Vec<RawDnsService>>,
    /// `[discovery.kubernetes]`
    pub kubernetes: Option<RawKubernetes>,
}

/// `[[discovery.dns]]`: a `[[services]]` entry whose endpoints come from DNS.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDnsService {
    /// `discovery.dns[].namespace`
    pub namespace: Option<String>,
    /// `discovery.dns[].name`
    pub name: Option<String>,
    /// `discovery.dns[].ports`
    pub ports: Option<Vec<RawPort>>,
    /// `discovery.dns[].export`
    pub export: Option<bool>,
    /// `discovery.dns[].allow_ids`
    pub allow_ids: Option<Vec<String>>,
    /// `discovery.dns[].allow_trust_domains`
    pub allow_trust_domains: Option<Vec<String>>,
    /// `discovery.dns[].mode`
    pub mode: Option<String>,
    /// `discovery.dns[].headless`
    pub headless: Option<bool>,
    /// `discovery.dns[].query`
    pub query: Option<String>,
    /// `discovery.dns[].record`
    pub record: Option<String>,
    /// `discovery.dns[].port`
    pub port: Option<i64>,
}

/// `[discovery.kubernetes]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKubernetes {
    /// `discovery.kubernetes.kubeconfig`
    pub kubeconfig: Option<String>,
    /// `discovery.kubernetes.context`
    pub context: Option<String>,
    /// `discovery.kubernetes.namespaces`
    pub namespaces: Option<Vec<String>>,
}

/// `[discovery]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscoveryConfig {
    /// Files of `[[services]]` tables, watched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<PathBuf>,
    /// Nameservers for `[[discovery.dns]]`; empty: `/etc/resolv.conf`'s.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_resolvers: Vec<SocketAddr>,
    /// Shortest time between two resolutions of a name.
    #[serde(with = "humantime_serde")]
    pub dns_min_ttl: Duration,
    /// Longest time between two resolutions of a name.
    #[serde(with = "humantime_serde")]
    pub dns_max_ttl: Duration,
    /// Time one query may take.
    #[serde(with = "humantime_serde")]
    pub dns_timeout: Duration,
    /// Services whose endpoints come from DNS.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<DnsServiceConfig>,
    /// Kubernetes, when watched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            files: Vec::new(),
            dns_resolvers: Vec::new(),
            dns_min_ttl: DEFAULT_DNS_MIN_TTL,
            dns_max_ttl: DEFAULT_DNS_MAX_TTL,
            dns_timeout: DEFAULT_DNS_TIMEOUT,
            dns: Vec::new(),
            kubernetes: None,
        }
    }
}

/// Which records give a DNS-discovered service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsRecordKind {
    /// SRV records (the port from each record).
    Srv,
    /// A and AAAA records (the port from `port`).
    A,
}

impl Keyword for DnsRecordKind {
    const KIND: &'static str = "record type";
    const WORDS: &'static [(&'static str, Self)] = &[("srv", Self::Srv), ("a", Self::A)];
    const NOTE: &'static str = " (A and AAAA)";
}

/// `[[discovery.dns]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsServiceConfig {
    /// Namespace.
    pub namespace: Namespace,
    /// Name.
    pub name: isthmus_federation::ServiceName,
    /// Ports.
    pub ports: Vec<PortConfig>,
    /// Visible to peer gateways.
    pub export: bool,
    /// Callers allowed through the east-west listener.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_ids: Vec<isthmus_federation::SpiffeId>,
    /// Trust domains allowed through the east-west listener.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_trust_domains: Vec<isthmus_federation::TrustDomain>,
    /// East-west mode.
    pub mode: EastWestMode,
    /// Headless: DNS publishes the endpoints.
    pub headless: bool,
    /// The name queried (absolute).
    pub query: String,
    /// Which records.
    pub record: DnsRecordKind,
    /// For `record = "a"`: the port the endpoints listen on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl DnsServiceConfig {
    /// The service, endpoints aside, as `[[services]]` has it.
    pub fn service(&self) -> ServiceConfig {
        ServiceConfig {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            ports: self.ports.clone(),
            endpoints: Vec::new(),
            subsets: Vec::new(),
            export: self.export,
            allow_ids: self.allow_ids.clone(),
            allow_trust_domains: self.allow_trust_domains.clone(),
            mode: self.mode,
            // Source networks are a `[[services]]` key only.
            allow_sources: Vec::new(),
            headless: self.headless,
        }
    }

    /// The DNS source's target.
    pub fn target(&self, cluster: &ClusterName) -> DnsTarget {
        DnsTarget {
            service: self.service().local_service(cluster),
            query: self.query.clone(),
            records: match (self.record, self.port) {
                (DnsRecordKind::A, Some(port)) => DnsRecords::Ip { port },
                // Validation requires a port for A records.
                (DnsRecordKind::A, None) | (DnsRecordKind::Srv, _) => DnsRecords::Srv,
            },
            cluster: cluster.clone(),
        }
    }
}

/// `[discovery.kubernetes]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KubernetesConfig {
    /// A kubeconfig file; absent: the in-cluster service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Its context; absent: its current context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Namespaces watched; empty: all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Namespace>,
}

impl DiscoveryConfig {
    /// How DNS sources resolve.
    pub fn dns_settings(&self) -> DnsSettings {
        DnsSettings {
            resolvers: self.dns_resolvers.clone(),
            min_ttl: self.dns_min_ttl,
            max_ttl: self.dns_max_ttl,
            timeout: self.dns_timeout,
        }
    }

    /// The Kubernetes source's settings, if it is on.
    pub fn kubernetes_settings(&self, cluster: &ClusterName) -> Option<KubernetesSettings> {
        self.kubernetes.as_ref().map(|k| KubernetesSettings {
            kubeconfig: k.kubeconfig.clone(),
            context: k.context.clone(),
            namespaces: k.namespaces.clone(),
            cluster: cluster.clone(),
        })
    }

    /// Makes file paths absolute, relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for file in &mut self.files {
            resolve_path(base, file);
        }
        if let Some(kubeconfig) = self.kubernetes.as_mut().and_then(|k| k.kubeconfig.as_mut()) {
            resolve_path(base, kubeconfig);
        }
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    parse_duration_between(s, DNS_TTL_BOUNDS.0, DNS_TTL_BOUNDS.1)
}

/// A discovered service may not open listeners: those are bound at start
/// from `[[services]]`.
fn refuse_listen(check: &mut Check, path: &str, ports: Option<&[RawPort]>) {
    for (j, p) in ports.unwrap_or_default().iter().enumerate() {
        if p.listen.is_some() {
            check.fail(
                format!("{path}.ports[{j}].listen"),
                "a discovered service cannot open a listener; give the tcp port its listen address in [[services]]",
            );
        }
    }
}

/// Moves errors about `services[0]` to `path`.
fn rebase(errors: Vec<ConfigError>, path: &str) -> impl Iterator<Item = ConfigError> {
    errors.into_iter().map(move |mut e| {
        if let Some(rest) = e.path.strip_prefix("services[0]") {
            e.path = format!("{path}{rest}");
        }
        e
    })
}

fn dns_service(check: &mut Check, i: usize, raw: &RawDnsService) -> Option<DnsServiceConfig> {
    let at = |field: &str| format!("discovery.dns[{i}].{field}");
    let before = check.errors.len();
    // The `[[services]]` rules, through the same code.
    let as_service = RawService {
        namespace: raw.namespace.clone(),
        name: raw.name.clone(),
        ports: raw.ports.clone(),
        endpoints: None,
        subsets: None,
        export: raw.export,
        allow_ids: raw.allow_ids.clone(),
        allow_trust_domains: raw.allow_trust_domains.clone(),
        mode: raw.mode.clone(),
        allow_sources: None,
        headless: raw.headless,
    };
    let mut inner = Check::default();
    let service = services(&mut inner, std::slice::from_ref(&as_service)).pop();
    let path = format!("discovery.dns[{i}]");
    check.errors.extend(rebase(inner.errors, &path));
    refuse_listen(check, &path, raw.ports.as_deref());

    let query = check.required(&at("query"), raw.query.as_deref(), dns::parse_query);
    let record = match raw.record.as_deref() {
        Some(s) => check.parsed(&at("record"), keyword::<DnsRecordKind>(s)),
        // `_http._tcp.<name>` is an SRV name.
        None => query.as_ref().map(|q| {
            if q.starts_with('_') {
                DnsRecordKind::Srv
            } else {
                DnsRecordKind::A
            }
        }),
    };
    let port = raw.port.and_then(|n| check.parsed(&at("port"), port(n)));
    let port = match record {
        Some(DnsRecordKind::Srv) if raw.port.is_some() => {
            check.fail(
                at("port"),
                "applies to record = \"a\" only; SRV records carry their ports",
            );
            None
        }
        Some(DnsRecordKind::A) if raw.port.is_none() => {
            match service.as_ref().map(|s| &s.ports[..]) {
                Some([only]) => Some(only.port),
                Some(_) => {
                    check.fail(
                    at("port"),
                    "is required for A/AAAA records when the service has more than one port: the port its endpoints listen on",
                );
                    None
                }
                None => None,
            }
        }
        _ => port,
    };
    if check.errors.len() > before {
        return None;
    }
    let service = service?;
    Some(DnsServiceConfig {
        namespace: service.namespace,
        name: service.name,
        ports: service.ports,
        export: service.export,
        allow_ids: service.allow_ids,
        allow_trust_domains: service.allow_trust_domains,
        mode: service.mode,
        headless: service.headless,
        query: query?,
        record: record?,
        port,
    })
}

fn kubernetes(check: &mut Check, raw: &RawKubernetes) -> Option<KubernetesConfig> {
    let before = check.errors.len();
    let kubeconfig = check.optional(
        "discovery.kubernetes.kubeconfig",
        raw.kubeconfig.as_deref(),
        parse_path,
    );
    let context = match raw.context.as_deref() {
        Some(_) if raw.kubeconfig.is_none() => {
            check.fail(
                "discovery.kubernetes.context",
                "needs kubeconfig; in the cluster the service account is used",
            );
            None
        }
        Some("") => {
            check.fail("discovery.kubernetes.context", "must not be empty");
            None
        }
        other => other.map(str::to_owned),
    };
    let namespaces = unique_list(
        check,
        "discovery.kubernetes.namespaces",
        raw.namespaces.as_deref(),
        Namespace::from_str,
        Namespace::to_string,
    );
    (check.errors.len() == before).then_some(KubernetesConfig {
        kubeconfig,
        context,
        namespaces,
    })
}

/// Checks `[discovery]`. On errors (recorded in `check`) the result is the
/// default and must not be used.
pub(super) fn discovery(check: &mut Check, raw: &RawDiscovery) -> DiscoveryConfig {
    let mut out = DiscoveryConfig {
        files: unique_list(
            check,
            "discovery.files",
            raw.files.as_deref(),
            parse_path,
            |p| p.display().to_string(),
        ),
        ..DiscoveryConfig::default()
    };
    for (i, r) in raw.dns_resolvers.iter().flatten().enumerate() {
        if let Some(addr) =
            check.parsed(&format!("discovery.dns_resolvers[{i}]"), parse_resolver(r))
        {
            out.dns_resolvers.push(addr);
        }
    }
    if let Some(s) = raw.dns_min_ttl.as_deref() {
        out.dns_min_ttl = check
            .parsed("discovery.dns_min_ttl", parse_ttl(s))
            .unwrap_or(out.dns_min_ttl);
    }
    if let Some(s) = raw.dns_max_ttl.as_deref() {
        out.dns_max_ttl = check
            .parsed("discovery.dns_max_ttl", parse_ttl(s))
            .unwrap_or(out.dns_max_ttl);
    }
    if out.dns_max_ttl < out.dns_min_ttl {
        check.fail(
            "discovery.dns_max_ttl",
            format!(
                "{} is shorter than discovery.dns_min_ttl ({})",
                humantime::format_duration(out.dns_max_ttl),
                humantime::format_duration(out.dns_min_ttl)
            ),
        );
    }
    if let Some(s) = raw.dns_timeout.as_deref() {
        out.dns_timeout = check
            .parsed(
                "discovery.dns_timeout",
                parse_duration(s, MAX_DNS_TIMEOUT).and_then(|d| {
                    if d.is_zero() {
                        Err("must be longer than zero".to_owned())
                    } else {
                        Ok(d)
                    }
                }),
            )
            .unwrap_or(out.dns_timeout);
    }
    for (i, d) in raw.dns.iter().flatten().enumerate() {
        if let Some(service) = dns_service(check, i, d) {
            if out
                .dns
                .iter()
                .any(|s| s.namespace == service.namespace && s.name == service.name)
            {
                check.fail(
                    format!("discovery.dns[{i}].name"),
                    format!("{}/{} is listed twice", service.namespace, service.name),
                );
            }
            out.dns.push(service);
        }
    }
    out.kubernetes = raw.kubernetes.as_ref().and_then(|k| kubernetes(check, k));
    out
}

/// A watched file: `[[services]]` tables and nothing else.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServicesFile {
    services: Option<Vec<RawService>>,
}

/// Parses a watched file of `[[services]]` tables, by the rules of the main
/// configuration's `[[services]]` (a discovered service may not open
/// listeners). Errors are `services[2].endpoints[0]: ...`; `origin` (the file)
/// names syntax errors.
pub fn parse_services_file(text: &str, origin: &str) -> Result<Vec<ServiceConfig>, ConfigErrors> {
    let value: toml::Value = toml::from_str(text).map_err(|e| {
        let reason = e.message().to_owned();
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start.min(text.len())].lines().count().max(1);
                format!(" (line {line})")
            })
            .unwrap_or_default();
        ConfigError::new(origin, format!("is not valid TOML{at}: {reason}"))
    })?;
    let raw: RawServicesFile = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        ConfigError::new(if path == "." { String::new() } else { path }, message)
    })?;
    let raw = raw.services.unwrap_or_default();
    let mut check = Check::default();
    for (i, s) in raw.iter().enumerate() {
        refuse_listen(&mut check, &format!("services[{i}]"), s.ports.as_deref());
    }
    let services = services(&mut check, &raw);
    if check.errors.is_empty() {
        Ok(services)
    } else {
        Err(ConfigErrors(check.errors))
    }
}

#[cfg(test)]
mod tests;
