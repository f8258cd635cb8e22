//! The service catalog: what the gateway can route to, published as immutable
//! snapshots the data plane reads without locks.
//!
//! A service is `(namespace, name)`; the same name in the same namespace in
//! every cluster is the same service (MCS namespace sameness). Each entry holds
//! the ports, the endpoints in this cluster, and the peer gateways that serve it
//! in other clusters. [`merge`] builds it from this cluster's discovery sources
//! and what each peer exports, by the MCS rules; consumers only see [`Catalog`].

mod merge;

pub(crate) use merge::zip_by_key;
pub use merge::{
    Conflict, Export, LocalService, PeerCatalog, changed_exports, changed_services, export_set,
    merge, merge_changed,
};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use crate::names::NameError;
use crate::{ClusterName, Hostname, Locality, Namespace, PortName, ServiceName, SpiffeId};

/// The zone of multi-cluster service names (MCS DNS spec).
pub const CLUSTERSET_ZONE: &str = "svc.clusterset.local";
/// The zone of Istio-style east-west SNI names.
pub const CLUSTER_ZONE: &str = "svc.cluster.local";

/// A service's identity across clusters: `(namespace, name)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    /// Its namespace.
    pub namespace: Namespace,
    /// Its name.
    pub name: ServiceName,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why `namespace/name` is not a service key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceKeyError {
    /// No `/` separating the two.
    #[error("must be written namespace/name")]
    Shape,
    /// The namespace is invalid.
    #[error("namespace {0}")]
    Namespace(NameError),
    /// The name is invalid.
    #[error("name {0}")]
    Name(NameError),
}

/// Parses `namespace/name`.
impl FromStr for ServiceKey {
    type Err = ServiceKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, name) = s.split_once('/').ok_or(ServiceKeyError::Shape)?;
        Ok(Self {
            namespace: ns.parse().map_err(ServiceKeyError::Namespace)?,
            name: name.parse().map_err(ServiceKeyError::Name)?,
        })
    }
}

/// The application protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2.
    Http,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque TCP.
    Tcp,
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http" => Ok(Self::Http),
            "grpc" => Ok(Self::Grpc),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!(
                "unknown protocol {other:?}; expected \"http\", \"grpc\" or \"tcp\""
            )),
        }
    }
}

impl Protocol {
    /// The name used in configuration and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
            Self::Tcp => "tcp",
        }
    }
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Its port number, the same in every cluster.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its name, which gives it an SRV record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<PortName>,
}

/// One endpoint of a headless service, with its own DNS name
/// `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct HeadlessEndpoint {
    /// The cluster it runs in.
    pub cluster: ClusterName,
    /// Its hostname, if it has one.
    pub hostname: Option<Hostname>,
    /// Its address.
    pub address: IpAddr,
}

/// Labels of an endpoint or gateway (`version = "v2"`, `network = "n1"`),
/// which subsets select on and `failover_priority` compares.
pub type Labels = BTreeMap<String, String>;

/// Longest label name or value.
pub const MAX_LABEL_LEN: usize = 63;

/// Checks a label name: 1 to 63 letters, digits, `-`, `_`, `.` or `/`
/// (Kubernetes label keys such as `topology.kubernetes.io/zone` fit).
pub fn validate_label_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_LABEL_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a label name: 1 to {MAX_LABEL_LEN} letters, digits, '-', '_', '.' or '/'"
        ))
    }
}

/// What is known of one endpoint in this cluster beyond its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointInfo {
    /// Where it runs, when it is not where this gateway runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    /// Its labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Its share of traffic relative to the other endpoints at the same
    /// priority (1 unless configured).
    pub weight: u32,
}

impl Default for EndpointInfo {
    fn default() -> Self {
        Self {
            locality: None,
            labels: Labels::new(),
            weight: 1,
        }
    }
}

/// A named subset of a service's endpoints, selected by labels (like an Istio
/// DestinationRule subset): `v2` is every endpoint labelled `version = "v2"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subset {
    /// Its name, carried in the east-west SNI and the `x-isthmus-subset` header.
    pub name: String,
    /// The labels an endpoint must all have.
    pub labels: Labels,
}

impl Subset {
    /// Whether an endpoint with `labels` belongs to it.
    pub fn selects(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The names of the `subsets` that select at least one of `endpoints`: what a
/// cluster tells its peers it can serve.
pub fn served_subsets(
    subsets: &[Subset],
    endpoints: &[SocketAddr],
    info: &BTreeMap<SocketAddr, EndpointInfo>,
) -> Vec<String> {
    let no_labels = Labels::new();
    subsets
        .iter()
        .filter(|s| {
            endpoints
                .iter()
                .any(|e| s.selects(info.get(e).map_or(&no_labels, |i| &i.labels)))
        })
        .map(|s| s.name.clone())
        .collect()
}

/// A peer gateway that serves a service in another cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteGateway {
    /// The cluster behind it.
    pub cluster: ClusterName,
    /// The SPIFFE ID it must present.
    pub spiffe_id: SpiffeId,
    /// Its east-west listener.
    pub address: SocketAddr,
    /// Where it runs.
    pub locality: Locality,
    /// Its labels (announced in its hello), compared by `failover_priority`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Whether its peering lease is live: false once its session closed or
    /// its lease lapsed (its services are then served only as a last resort,
    /// until they expire). Statically configured peers are always live.
    pub live: bool,
    /// Its share of its cluster's traffic relative to the cluster's other
    /// gateways (replicas), as announced in its hello; 1 for a static peer.
    pub weight: u32,
    /// The subsets of this service it has endpoints for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<String>,
}

/// Everything known about one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    /// Its key.
    pub key: ServiceKey,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// Endpoints in this cluster.
    pub endpoints: Vec<SocketAddr>,
    /// Locality, labels and weight of the endpoints that have any.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoint_info: BTreeMap<SocketAddr, EndpointInfo>,
    /// Its subsets, as this cluster defines them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Peer gateways serving it elsewhere.
    pub remote: Vec<RemoteGateway>,
    /// Visible to peer gateways (MCS ServiceExport).
    pub exported: bool,
    /// Callers (peer gateways) allowed to reach it through the east-west
    /// listener; `None` admits every peer the listener admits.
    pub allowed_callers: Option<crate::trust::PeerPolicy>,
    /// East-west mode: `true` routes peers' TLS by SNI to the endpoints
    /// without terminating it (workloads doing their own mTLS).
    pub passthrough: bool,
    /// Headless (no clusterset IP): DNS answers with the endpoints themselves.
    pub headless: bool,
    /// The endpoints DNS publishes for a headless service, from every cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headless_endpoints: Vec<HeadlessEndpoint>,
}

impl ServiceEntry {
    /// An exported entry keyed `key` and nothing more: no ports, endpoints,
    /// subsets, peer gateways or caller policy, neither passthrough nor
    /// headless. Callers fill in what they need with `..` struct update.
    pub fn exported(key: ServiceKey) -> Self {
        Self {
            key,
            ports: vec![],
            endpoints: vec![],
            endpoint_info: BTreeMap::new(),
            subsets: vec![],
            remote: vec![],
            exported: true,
            allowed_callers: None,
            passthrough: false,
            headless: false,
            headless_endpoints: vec![],
        }
    }

    /// The subset named `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The port numbered `port`, or the only port when `port` is `None`.
    pub fn port(&self, port: Option<u16>) -> Option<&ServicePort> {
        match port {
            Some(p) => self.ports.iter().find(|sp| sp.port == p),
            None if self.ports.len() == 1 => self.ports.first(),
            None => None,
        }
    }
}

/// An immutable catalog snapshot. Entries are shared, so a request can hold
/// its service's entry after the catalog moved on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Catalog {
    services: BTreeMap<ServiceKey, Arc<ServiceEntry>>,
    /// Definitions that disagreed across clusters, and which one won.
    conflicts: Vec<Conflict>,
    /// The cluster of each peer gateway known when the snapshot was made
    /// (configured, or admitted by its hello): who an east-west caller is.
    #[serde(skip)]
    gateways: HashMap<SpiffeId, ClusterName>,
}

impl Catalog {
    /// A catalog of `entries`.
    pub fn new(entries: impl IntoIterator<Item = ServiceEntry>) -> Self {
        Self {
            services: entries
                .into_iter()
                .map(|e| (e.key.clone(), Arc::new(e)))
                .collect(),
            conflicts: Vec::new(),
            gateways: HashMap::new(),
        }
    }

    /// This catalog knowing `gateways`: peer gateways' SPIFFE IDs and the
    /// cluster each speaks for.
    #[must_use]
    pub fn with_gateways(
        mut self,
        gateways: impl IntoIterator<Item = (SpiffeId, ClusterName)>,
    ) -> Self {
        self.gateways = gateways.into_iter().collect();
        self
    }

    /// The cluster of the peer gateway `id`; `None` when it is no known peer.
    pub fn gateway_cluster(&self, id: &SpiffeId) -> Option<&ClusterName> {
        self.gateways.get(id)
    }

    /// The entry for `key`.
    pub fn get(&self, key: &ServiceKey) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    /// How many services it holds.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether it holds no service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The conflicts found while merging.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }
}

/// A service name as a client addresses it, with its port if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed {
    /// The service.
    pub key: ServiceKey,
    /// The port, if the name carried one.
    pub port: Option<u16>,
}

/// Parses an HTTP `Host`/`:authority`: `<svc>.<ns>.svc.clusterset.local[:port]`
/// (also `<svc>.<ns>[.svc][:port]` and a trailing dot, as clients search domains
/// produce). `None` when it names no service.
pub fn parse_authority(authority: &str) -> Option<Addressed> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') && !h.is_empty() => (h, Some(p.parse::<u16>().ok()?)),
        _ => (authority, None),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let stem = host
        .strip_suffix(&format!(".{CLUSTERSET_ZONE}"))
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(&host);
    let (name, namespace) = stem.split_once('.')?;
    if namespace.contains('.') {
        return None;
    }
    Some(Addressed {
        key: ServiceKey {
            namespace: namespace.parse().ok()?,
            name: name.parse().ok()?,
        },
        port,
    })
}

/// The east-west SNI for a service port, Istio-compatible:
/// `outbound_.<port>_.<subset>_.<svc>.<ns>.svc.cluster.local` (`_` for no subset).
pub fn east_west_sni(key: &ServiceKey, port: u16, subset: Option<&str>) -> String {
    format!(
        "outbound_.{port}_.{}_.{}.{}.{CLUSTER_ZONE}",
        subset.unwrap_or(""),
        key.name,
        key.namespace
    )
}

/// What an east-west SNI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniTarget {
    /// The service.
    pub key: ServiceKey,
    /// The port.
    pub port: u16,
    /// The subset, if any.
    pub subset: Option<String>,
}

/// Parses an east-west SNI; `None` when it is not one.
pub fn parse_east_west_sni(sni: &str) -> Option<SniTarget> {
    let rest = sni.strip_prefix("outbound_.")?;
    let (port, rest) = rest.split_once("_.")?;
    let (subset, rest) = rest.split_once("_.")?;
    let stem = rest.strip_suffix(&format!(".{CLUSTER_ZONE}"))?;
    let (name, namespace) = stem.split_once('.')?;
    if namespace.contains('.') {
        return None;
    }
    Some(SniTarget {
        key: ServiceKey {
            namespace: namespace.parse().ok()?,
            name: name.parse().ok()?,
        },
        port: port.parse().ok()?,
        subset: (!subset.is_empty()).then(|| subset.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ServiceKey {
        s.parse().unwrap()
    }

    #[test]
    fn authorities_name_services() {
        let a = parse_authority("web.shop.svc.clusterset.local:8080").unwrap();
        assert_eq!((a.key, a.port), (key("shop/web"), Some(8080)));
        assert_eq!(
            parse_authority("web.shop.svc.clusterset.local.")
                .unwrap()
                .port,
            None
        );
        assert_eq!(
            parse_authority("WEB.Shop.svc").unwrap().key,
            key("shop/web")
        );
        assert_eq!(parse_authority("web.shop").unwrap().key, key("shop/web"));
        for bad in [
            "web",
            "web.shop.example.com",
            "web.shop:x",
            "-x.shop",
            "[::1]:80",
            "",
        ] {
            assert_eq!(parse_authority(bad), None, "{bad}");
        }
    }

    #[test]
    fn east_west_sni_round_trips_in_istio_format() {
        let k = key("shop/web");
        assert_eq!(
            east_west_sni(&k, 8080, None),
            "outbound_.8080_._.web.shop.svc.cluster.local"
        );
        assert_eq!(
            east_west_sni(&k, 9090, Some("v2")),
            "outbound_.9090_.v2_.web.shop.svc.cluster.local"
        );
        let t = parse_east_west_sni("outbound_.8080_._.web.shop.svc.cluster.local").unwrap();
        assert_eq!((t.key, t.port, t.subset), (k.clone(), 8080, None));
        let t = parse_east_west_sni("outbound_.9090_.v2_.web.shop.svc.cluster.local").unwrap();
        assert_eq!(t.subset.as_deref(), Some("v2"));
        for bad in [
            "web.shop.svc.cluster.local",
            "outbound_.x_._.web.shop.svc.cluster.local",
            "outbound_.80_._.web.shop.svc.cluster.example",
            "outbound_.80_._.web.shop.extra.svc.cluster.local",
        ] {
            assert_eq!(parse_east_west_sni(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_single_port_is_the_default() {
        let entry = ServiceEntry {
            ports: vec![ServicePort {
                port: 80,
                protocol: Protocol::Http,
                name: None,
            }],
            ..ServiceEntry::exported(key("shop/web"))
        };
        assert_eq!(entry.port(None).unwrap().port, 80);
        assert!(entry.port(Some(81)).is_none());
    }
}
