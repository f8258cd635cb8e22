//! `[[services]]`: the services of this cluster, their ports, endpoints
//! (address, locality, labels, weight) and subsets, who may call them through
//! the east-west listener, and how (terminated or passed through).
//!
//! `services()` also checks the services of watched files and of
//! `[[discovery.dns]]`, which follow the same rules.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use isthmus_federation::catalog::{
    EndpointInfo, Export, HeadlessEndpoint, LocalService, Protocol, ServiceKey, ServicePort, Subset,
};
use isthmus_federation::names::validate_label;
use isthmus_federation::trust::PeerPolicy;
use isthmus_federation::{ClusterName, Locality, SpiffeId, TrustDomain};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::parse::{
    Check, Keyword, keyword, labels, list, parse_network, parse_socket_addr, port,
    serialize_display_list, weight,
};

/// `[[services]]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// `services[].namespace`
    pub namespace: Option<String>,
    /// `services[].name`
    pub name: Option<String>,
    /// `services[].ports`
    pub ports: Option<Vec<RawPort>>,
    /// `services[].endpoints`
    pub endpoints: Option<Vec<RawEndpoint>>,
    /// `services[].subsets`
    pub subsets: Option<Vec<RawSubset>>,
    /// `services[].export`
    pub export: Option<bool>,
    /// `services[].allow_ids`
    pub allow_ids: Option<Vec<String>>,
    /// `services[].allow_trust_domains`
    pub allow_trust_domains: Option<Vec<String>>,
    /// `services[].mode`
    pub mode: Option<String>,
    /// `services[].allow_sources`
    pub allow_sources: Option<Vec<String>>,
    /// `services[].headless`
    pub headless: Option<bool>,
}

/// `services[].ports[]` as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPort {
    /// `services[].ports[].port`
    pub port: Option<i64>,
    /// `services[].ports[].protocol`
    pub protocol: Option<String>,
    /// `services[].ports[].listen`
    pub listen: Option<String>,
    /// `services[].ports[].name`
    pub name: Option<String>,
}

/// `services[].endpoints[]`: `"ip:port"`, or a table with its locality,
/// labels and weight.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum RawEndpoint {
    /// `"ip:port"`
    Address(String),
    /// `{ address = "ip:port", locality = "region/zone", labels = {..}, weight = 2 }`
    Table(RawEndpointTable),
}

/// Deserialized by hand: serde's untagged enums say only "did not match any
/// variant", where a user needs to be told the two accepted shapes.
impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Shape;
        impl<'de> Visitor<'de> for Shape {
            type Value = RawEndpoint;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an address \"ip:port\" or a table { address, locality, labels, weight }",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawEndpoint, E> {
                Ok(RawEndpoint::Address(s.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawEndpoint, A::Error> {
                RawEndpointTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawEndpoint::Table)
            }
        }
        d.deserialize_any(Shape)
    }
}

/// `services[].endpoints[]` as a table.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpointTable {
    /// `services[].endpoints[].address`
    pub address: Option<String>,
    /// `services[].endpoints[].locality`
    pub locality: Option<String>,
    /// `services[].endpoints[].labels`
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// `services[].endpoints[].weight`
    pub weight: Option<i64>,
}

/// `services[].subsets[]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubset {
    /// `services[].subsets[].name`
    pub name: Option<String>,
    /// `services[].subsets[].labels`
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// `[[services]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceConfig {
    /// Namespace.
    pub namespace: isthmus_federation::Namespace,
    /// Name.
    pub name: isthmus_federation::ServiceName,
    /// Ports.
    pub ports: Vec<PortConfig>,
    /// Endpoints in this cluster.
    pub endpoints: Vec<EndpointConfig>,
    /// Named subsets of the endpoints, by labels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Visible to peer gateways.
    pub export: bool,
    /// Callers allowed through the east-west listener (with
    /// `allow_trust_domains`); both empty: every admitted peer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_ids: Vec<SpiffeId>,
    /// Trust domains whose every gateway and workload may call it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_trust_domains: Vec<TrustDomain>,
    /// East-west mode.
    pub mode: EastWestMode,
    /// Passthrough only: the source networks whose connections the east-west
    /// listener splices to the endpoints; empty: any source.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_display_list"
    )]
    pub allow_sources: Vec<ipnet::IpNet>,
    /// Headless: DNS answers with the endpoints, not a clusterset IP.
    pub headless: bool,
}

impl ServiceConfig {
    /// The service as the catalog has it, in `cluster`.
    pub fn local_service(&self, cluster: &ClusterName) -> LocalService {
        let headless_endpoints = if self.headless {
            self.endpoints
                .iter()
                .map(|e| HeadlessEndpoint {
                    cluster: cluster.clone(),
                    hostname: None,
                    address: e.address.ip(),
                })
                .collect()
        } else {
            Vec::new()
        };
        LocalService {
            export: Export {
                key: self.key(),
                ports: self.service_ports(),
                // The hub stamps the time it first sees the export.
                export_time_millis: 0,
                headless: self.headless,
                endpoints: headless_endpoints,
                subsets: Vec::new(),
            },
            endpoints: self.endpoints.iter().map(|e| e.address).collect(),
            endpoint_info: self
                .endpoints
                .iter()
                .filter(|e| e.info != EndpointInfo::default())
                .map(|e| (e.address, e.info.clone()))
                .collect(),
            subsets: self.subsets.clone(),
            exported: self.export,
            allowed_callers: (!self.allow_ids.is_empty() || !self.allow_trust_domains.is_empty())
                .then(|| {
                    PeerPolicy::new(
                        self.allow_ids.iter().cloned(),
                        self.allow_trust_domains.iter().cloned(),
                    )
                }),
            passthrough: self.mode == EastWestMode::Passthrough,
        }
    }

    /// Whether a passthrough connection from `source` may reach it.
    pub fn admits_source(&self, source: IpAddr) -> bool {
        let source = match source {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
            v4 => v4,
        };
        self.allow_sources.is_empty() || self.allow_sources.iter().any(|n| n.contains(&source))
    }

    /// Its `namespace/name`.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Its ports as the catalog has them.
    pub fn service_ports(&self) -> Vec<ServicePort> {
        self.ports
            .iter()
            .map(|p| ServicePort {
                port: p.port,
                protocol: p.protocol,
                name: p.name.clone(),
            })
            .collect()
    }
}

/// How the east-west listener handles a service's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EastWestMode {
    /// Terminate the peer gateway's mTLS; route each request (L7).
    Terminate,
    /// Route the peer's TLS by SNI without terminating it (Istio AUTO_PASSTHROUGH).
    Passthrough,
}

impl Keyword for EastWestMode {
    const KIND: &'static str = "mode";
    const WORDS: &'static [(&'static str, Self)] = &[
        ("terminate", Self::Terminate),
        ("passthrough", Self::Passthrough),
    ];
}

impl FromStr for EastWestMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        keyword(s)
    }
}

/// `services[].ports[]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortConfig {
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// For `tcp` ports: where local workloads connect to reach the service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Its name, for DNS SRV records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<isthmus_federation::PortName>,
}

/// `services[].endpoints[]`: an address, with its locality, labels and weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// The rest (defaults when given as a plain address).
    pub info: EndpointInfo,
}

/// As it was written: `"ip:port"` when it has nothing else, a table otherwise
/// (so the effective configuration parses back).
impl Serialize for EndpointConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.info == EndpointInfo::default() {
            return s.collect_str(&self.address);
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("address", &self.address.to_string())?;
        if let Some(l) = &self.info.locality {
            map.serialize_entry("locality", &l.to_string())?;
        }
        if !self.info.labels.is_empty() {
            map.serialize_entry("labels", &self.info.labels)?;
        }
        map.serialize_entry("weight", &self.info.weight)?;
        map.end()
    }
}

/// Checks `[[services]]` (or the services of a watched file).
pub(super) fn services(check: &mut Check, raw: &[RawService]) -> Vec<ServiceConfig> {
    let mut out: Vec<ServiceConfig> = Vec::new();
    for (i, svc) in raw.iter().enumerate() {
        let at = |field: &str| format!("services[{i}].{field}");
        let before = check.errors.len();
        let namespace = check.required(&at("namespace"), svc.namespace.as_deref(), str::parse);
        let name = check.required(&at("name"), svc.name.as_deref(), str::parse);
        let raw_ports = svc.ports.as_deref().unwrap_or_default();
        if raw_ports.is_empty() {
            check.fail(at("ports"), "needs at least one port");
        }
        let ports = ports(check, &at("ports"), raw_ports);
        let endpoints = endpoints(check, &at("endpoints"), svc.endpoints.as_deref());
        let subsets = subsets(check, &at("subsets"), svc.subsets.as_deref());
        let allow_ids = list(
            check,
            &at("allow_ids"),
            svc.allow_ids.as_deref(),
            SpiffeId::from_str,
        );
        let allow_trust_domains = list(
            check,
            &at("allow_trust_domains"),
            svc.allow_trust_domains.as_deref(),
            TrustDomain::from_str,
        );
        let mode = check.or_value(
            &at("mode"),
            svc.mode.as_deref(),
            EastWestMode::Terminate,
            EastWestMode::from_str,
        );
        if mode == Some(EastWestMode::Passthrough)
            && (!allow_ids.is_empty() || !allow_trust_domains.is_empty())
        {
            check.fail(
                at("mode"),
                "passthrough does not terminate TLS, so allow_ids/allow_trust_domains cannot be enforced; the workloads authorize",
            );
        }
        let allow_sources = list(
            check,
            &at("allow_sources"),
            svc.allow_sources.as_deref(),
            parse_network,
        );
        if svc.allow_sources.is_some() && mode != Some(EastWestMode::Passthrough) {
            check.fail(
                at("allow_sources"),
                "applies to mode = \"passthrough\" only; terminated services authorize callers by SPIFFE ID (allow_ids, allow_trust_domains)",
            );
        } else if svc.allow_sources.as_ref().is_some_and(Vec::is_empty) {
            check.fail(
                at("allow_sources"),
                "is empty, which would refuse every source; leave it out to admit any source",
            );
        }
        if check.errors.len() > before {
            continue;
        }
        let (Some(namespace), Some(name), Some(mode)) = (namespace, name, mode) else {
            continue;
        };
        if out
            .iter()
            .any(|s| s.namespace == namespace && s.name == name)
        {
            check.fail(at("name"), format!("{namespace}/{name} is listed twice"));
            continue;
        }
        out.push(ServiceConfig {
            namespace,
            name,
            ports,
            endpoints,
            subsets,
            export: svc.export.unwrap_or(false),
            allow_ids,
            allow_trust_domains,
            mode,
            allow_sources,
            headless: svc.headless.unwrap_or(false),
        });
    }
    out
}

/// `services[].ports`
fn ports(check: &mut Check, path: &str, raw: &[RawPort]) -> Vec<PortConfig> {
    let mut out: Vec<PortConfig> = Vec::new();
    for (j, p) in raw.iter().enumerate() {
        let at = |field: &str| format!("{path}[{j}].{field}");
        let number = match p.port {
            Some(n) => check.parsed(&at("port"), port(n)),
            None => {
                check.fail(at("port"), "is required");
                None
            }
        };
        let protocol = check.or_value(
            &at("protocol"),
            p.protocol.as_deref(),
            Protocol::Http,
            Protocol::from_str,
        );
        let listen = check.optional(&at("listen"), p.listen.as_deref(), parse_socket_addr);
        if p.listen.is_some() && protocol.is_some_and(|proto| proto != Protocol::Tcp) {
            check.fail(
                at("listen"),
                "applies to tcp ports only; HTTP and gRPC use listeners.outbound",
            );
        }
        let name = check.optional(&at("name"), p.name.as_deref(), |n| {
            n.parse::<isthmus_federation::PortName>()
        });
        if let (Some(number), Some(protocol)) = (number, protocol) {
            if out.iter().any(|q| q.port == number) {
                check.fail(at("port"), format!("{number} is listed twice"));
            }
            out.push(PortConfig {
                port: number,
                protocol,
                listen,
                name,
            });
        }
    }
    out
}

/// `services[].endpoints`
fn endpoints(check: &mut Check, path: &str, raw: Option<&[RawEndpoint]>) -> Vec<EndpointConfig> {
    let mut out: Vec<EndpointConfig> = Vec::new();
    for (i, e) in raw.unwrap_or_default().iter().enumerate() {
        let at = |field: &str| format!("{path}[{i}]{field}");
        let (address, table) = match e {
            RawEndpoint::Address(a) => (check.parsed(&at(""), parse_socket_addr(a)), None),
            RawEndpoint::Table(t) => (
                check.required(&at(".address"), t.address.as_deref(), parse_socket_addr),
                Some(t),
            ),
        };
        let details = table.and_then(|t| {
            let locality = check.optional(&at(".locality"), t.locality.as_deref(), |l| {
                Locality::from_str(l).map_err(|e| e.to_string())
            });
            let labels = labels(check, &at(".labels"), t.labels.as_ref());
            let weight = weight(check, &at(".weight"), t.weight, 1);
            Some(EndpointInfo {
                locality,
                labels,
                weight: weight?,
            })
        });
        let Some(address) = address else { continue };
        if out.iter().any(|e| e.address == address) {
            check.fail(at(""), format!("{address} is listed twice"));
            continue;
        }
        if table.is_some() && details.is_none() {
            continue;
        }
        out.push(EndpointConfig {
            address,
            info: details.unwrap_or_default(),
        });
    }
    out
}

/// `services[].subsets`
fn subsets(check: &mut Check, path: &str, raw: Option<&[RawSubset]>) -> Vec<Subset> {
    let mut out: Vec<Subset> = Vec::new();
    for (i, s) in raw.unwrap_or_default().iter().enumerate() {
        let at = |field: &str| format!("{path}[{i}].{field}");
        let name = check.required(&at("name"), s.name.as_deref(), |n| {
            validate_label(n).map(|()| n.to_owned())
        });
        let labels = labels(check, &at("labels"), s.labels.as_ref());
        if labels.is_empty() {
            check.fail(
                at("labels"),
                "is required: the labels an endpoint must have to be in the subset",
            );
            continue;
        }
        let Some(name) = name else { continue };
        if out.iter().any(|o| o.name == name) {
            check.fail(at("name"), format!("{name:?} is listed twice"));
            continue;
        }
        out.push(Subset { name, labels });
    }
    out
}
