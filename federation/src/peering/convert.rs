//! Conversions between peering messages and the catalog model.
//!
//! Everything a peer sends is untrusted input: each field is checked, and a
//! problem is reported with the path of the field (`services[3].ports[0].port`)
//! so a NACK tells the sender exactly what was wrong.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::authority::PeeringLimits;
use super::proto;
use crate::catalog::{
    Export, HeadlessEndpoint, Labels, MAX_LABEL_LEN, Protocol, ServiceKey, ServicePort,
    validate_label_name,
};
use crate::names::validate_label;
use crate::trust::tls::GATEWAY_PATH_PREFIX;
use crate::{ClusterName, Locality, SpiffeId};

/// This protocol's version, sent in every hello.
pub const PROTOCOL_VERSION: u32 = 1;
/// The shortest lease a peer may ask for: shorter would flood the stream.
pub const MIN_LEASE: Duration = Duration::from_millis(500);
/// The longest lease a peer may ask for: a dead peer must not linger for long.
pub const MAX_LEASE: Duration = Duration::from_secs(600);
/// Most labels a hello may carry.
pub const MAX_LABELS: usize = 64;
/// Largest weight a gateway may announce (the same bound as endpoint
/// weights).
pub const MAX_WEIGHT: u32 = 10_000;
/// Most subsets one exported service may announce (a handful in practice:
/// versions, canaries).
pub const MAX_SUBSETS: usize = 64;

/// A field of a peering message that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConvertError {
    /// The field, e.g. `services[3].ports[0].protocol`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConvertError {
    fn new(path: impl Into<String>, message: impl ToString) -> Self {
        Self {
            path: path.into(),
            message: message.to_string(),
        }
    }

    fn within(self, prefix: &str) -> Self {
        Self {
            path: format!("{prefix}.{}", self.path),
            message: self.message,
        }
    }
}

/// A peer's hello, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    /// Its gateway SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Where it runs.
    pub locality: Locality,
    /// Its east-west listener, if it has one.
    pub east_west: Option<SocketAddr>,
    /// Its process incarnation.
    pub incarnation: u64,
    /// How often it renews its lease at the latest.
    pub lease: Duration,
    /// Its labels.
    pub labels: Labels,
    /// Its share of its cluster's traffic, relative to the cluster's other
    /// gateways (replicas); 1 to [`MAX_WEIGHT`].
    pub weight: u32,
}

impl PeerHello {
    /// The message form.
    pub fn to_proto(&self) -> proto::Hello {
        proto::Hello {
            protocol_version: PROTOCOL_VERSION,
            spiffe_id: self.spiffe_id.to_string(),
            cluster: self.cluster.to_string(),
            trust_domain: self.spiffe_id.trust_domain_str().to_owned(),
            locality: Some(proto::Locality {
                region: self.locality.region().to_owned(),
                zone: self.locality.zone().unwrap_or_default().to_owned(),
                subzone: self.locality.subzone().unwrap_or_default().to_owned(),
            }),
            east_west_address: self.east_west.map(|a| a.to_string()).unwrap_or_default(),
            incarnation: self.incarnation,
            lease_millis: millis(self.lease),
            labels: self.labels.clone().into_iter().collect(),
            weight: self.weight,
            // Per session: see [`Resume::stamp`].
            resume_incarnation: 0,
            resume_version: 0,
        }
    }

    /// Checks a hello from the peer that proved `authenticated` in the TLS
    /// handshake: the two identities must be the same.
    pub fn from_proto(
        hello: &proto::Hello,
        authenticated: &SpiffeId,
    ) -> Result<Self, ConvertError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ConvertError::new(
                "protocol_version",
                format!(
                    "{} is not supported; this gateway speaks {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            ));
        }
        let spiffe_id: SpiffeId = hello
            .spiffe_id
            .parse()
            .map_err(|e| ConvertError::new("spiffe_id", e))?;
        if !spiffe_id.path().starts_with(GATEWAY_PATH_PREFIX) {
            // Only gateways peer: a workload SVID of a federated trust domain
            // must not pass for one.
            return Err(ConvertError::new(
                "spiffe_id",
                format!("{spiffe_id} is not a gateway identity ({GATEWAY_PATH_PREFIX}<name>)"),
            ));
        }
        if &spiffe_id != authenticated {
            return Err(ConvertError::new(
                "spiffe_id",
                format!(
                    "{spiffe_id} is not the identity proved in the handshake ({authenticated})"
                ),
            ));
        }
        if hello.trust_domain != spiffe_id.trust_domain_str() {
            return Err(ConvertError::new(
                "trust_domain",
                format!(
                    "{:?} is not the trust domain of {spiffe_id}",
                    hello.trust_domain
                ),
            ));
        }
        let cluster = hello
            .cluster
            .parse()
            .map_err(|e| ConvertError::new("cluster", e))?;
        let locality = locality(hello.locality.as_ref()).map_err(|e| e.within("locality"))?;
        let east_west = match hello.east_west_address.as_str() {
            "" => None,
            a => Some(a.parse().map_err(|_| {
                ConvertError::new("east_west_address", format!("{a:?} is not ip:port"))
            })?),
        };
        let lease = Duration::from_millis(hello.lease_millis);
        if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
            return Err(ConvertError::new(
                "lease_millis",
                format!(
                    "{} ms is outside {}..={} ms",
                    hello.lease_millis,
                    millis(MIN_LEASE),
                    millis(MAX_LEASE)
                ),
            ));
        }
        if hello.labels.len() > MAX_LABELS {
            return Err(ConvertError::new(
                "labels",
                format!("{} labels; at most {MAX_LABELS}", hello.labels.len()),
            ));
        }
        let mut labels = Labels::new();
        for (k, v) in &hello.labels {
            validate_label_name(k).map_err(|e| ConvertError::new("labels", e))?;
            if v.len() > MAX_LABEL_LEN {
                return Err(ConvertError::new(
                    format!("labels.{k}"),
                    format!("longer than {MAX_LABEL_LEN} bytes"),
                ));
            }
            labels.insert(k.clone(), v.clone());
        }
        let weight = match hello.weight {
            0 => 1,
            w if w <= MAX_WEIGHT => w,
            w => {
                return Err(ConvertError::new(
                    "weight",
                    format!("{w} is outside 1..={MAX_WEIGHT}"),
                ));
            }
        };
        Ok(Self {
            spiffe_id,
            cluster,
            locality,
            east_west,
            incarnation: hello.incarnation,
            lease,
            labels,
            weight,
        })
    }
}

/// What the sender of a hello holds of the receiver's catalog from an
/// earlier session (the hello's `resume_*` fields): a version within one of
/// the receiver's incarnations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The receiver's incarnation.
    pub incarnation: u64,
    /// The version applied.
    pub version: u64,
}

impl Resume {
    /// What `hello` says its sender holds; `None`: nothing (0, as peers
    /// that predate resuming send).
    pub fn of(hello: &proto::Hello) -> Option<Self> {
        (hello.resume_incarnation != 0 && hello.resume_version != 0).then_some(Self {
            incarnation: hello.resume_incarnation,
            version: hello.resume_version,
        })
    }

    /// Writes `held` into `hello`.
    pub fn stamp(held: Option<Self>, hello: &mut proto::Hello) {
        let held = held.unwrap_or(Self {
            incarnation: 0,
            version: 0,
        });
        hello.resume_incarnation = held.incarnation;
        hello.resume_version = held.version;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn locality(l: Option<&proto::Locality>) -> Result<Locality, ConvertError> {
    let l = l.ok_or_else(|| ConvertError::new("region", "is required"))?;
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let (zone, subzone) = (opt(&l.zone), opt(&l.subzone));
    Locality::new(&l.region, zone.as_deref(), subzone.as_deref())
        .map_err(|e| ConvertError::new("region", e))
}

/// The message form of an export by `cluster`.
pub fn export_to_proto(export: &Export, cluster: &ClusterName) -> proto::ExportedService {
    proto::ExportedService {
        namespace: export.key.namespace.to_string(),
        name: export.key.name.to_string(),
        ports: export
            .ports
            .iter()
            .map(|p| proto::ServicePort {
                port: u32::from(p.port),
                protocol: p.protocol.as_str().to_owned(),
                name: p.name.as_ref().map(ToString::to_string).unwrap_or_default(),
            })
            .collect(),
        export_time_millis: export.export_time_millis,
        origin_cluster: cluster.to_string(),
        headless: export.headless,
        endpoints: export
            .endpoints
            .iter()
            .map(|e| proto::Endpoint {
                hostname: e
                    .hostname
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                address: e.address.to_string(),
            })
            .collect(),
        subsets: export.subsets.clone(),
    }
}

/// Refuses a service carrying `len` `field`, more than `max`.
fn at_most(field: &str, len: usize, max: usize) -> Result<(), ConvertError> {
    if len > max {
        let message = format!("{len} {field}; at most {max} per service");
        return Err(ConvertError::new(field, message));
    }
    Ok(())
}

/// Checks one exported service of the peer fronting `cluster`, within
/// `limits`. An export whose origin is another cluster is refused: gateways
/// export only their own cluster's services, so accepting it could route in a
/// loop.
pub fn export_from_proto(
    service: &proto::ExportedService,
    cluster: &ClusterName,
    limits: &PeeringLimits,
) -> Result<Export, ConvertError> {
    let key = service_key(&service.namespace, &service.name)?;
    // Caps first: each port may become a listener and each endpoint a DNS
    // record, so a peer must not make this gateway allocate without bound.
    at_most("ports", service.ports.len(), limits.max_ports_per_service)?;
    at_most(
        "endpoints",
        service.endpoints.len(),
        limits.max_endpoints_per_service,
    )?;
    if service.origin_cluster != cluster.as_str() {
        return Err(ConvertError::new(
            "origin_cluster",
            format!(
                "{:?} is not the sender's cluster {cluster:?}; gateways export only their own services",
                service.origin_cluster
            ),
        ));
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(service.ports.len());
    let mut seen_ports = std::collections::HashSet::with_capacity(service.ports.len());
    for (i, p) in service.ports.iter().enumerate() {
        let path = |field: &str| format!("ports[{i}].{field}");
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                ConvertError::new(path("port"), format!("{} is not 1..=65535", p.port))
            })?;
        if !seen_ports.insert(port) {
            return Err(ConvertError::new(
                path("port"),
                format!("{port} is listed twice"),
            ));
        }
        let protocol: Protocol = p
            .protocol
            .parse()
            .map_err(|e| ConvertError::new(path("protocol"), e))?;
        let name = match p.name.as_str() {
            "" => None,
            n => Some(n.parse().map_err(|e| ConvertError::new(path("name"), e))?),
        };
        ports.push(ServicePort {
            port,
            protocol,
            name,
        });
    }
    let mut endpoints = Vec::with_capacity(service.endpoints.len());
    for (i, e) in service.endpoints.iter().enumerate() {
        let path = |field: &str| format!("endpoints[{i}].{field}");
        let address: IpAddr = e.address.parse().map_err(|_| {
            ConvertError::new(
                path("address"),
                format!("{:?} is not an IP address", e.address),
            )
        })?;
        let hostname = match e.hostname.as_str() {
            "" => None,
            h => Some(
                h.parse()
                    .map_err(|e| ConvertError::new(path("hostname"), e))?,
            ),
        };
        endpoints.push(HeadlessEndpoint {
            cluster: cluster.clone(),
            hostname,
            address,
        });
    }
    if service.subsets.len() > MAX_SUBSETS {
        return Err(ConvertError::new(
            "subsets",
            format!("{} subsets; at most {MAX_SUBSETS}", service.subsets.len()),
        ));
    }
    let mut subsets = Vec::with_capacity(service.subsets.len());
    for (i, s) in service.subsets.iter().enumerate() {
        validate_label(s).map_err(|e| ConvertError::new(format!("subsets[{i}]"), e))?;
        if !subsets.contains(s) {
            subsets.push(s.clone());
        }
    }
    if !service.headless && !endpoints.is_empty() {
        return Err(ConvertError::new(
            "endpoints",
            "only headless services publish endpoints",
        ));
    }
    Ok(Export {
        key,
        ports,
        export_time_millis: service.export_time_millis,
        headless: service.headless,
        endpoints,
        subsets,
    })
}

/// Checks a `namespace`/`name` pair.
pub fn service_key(namespace: &str, name: &str) -> Result<ServiceKey, ConvertError> {
    Ok(ServiceKey {
        namespace: namespace
            .parse()
            .map_err(|e| ConvertError::new("namespace", e))?,
        name: name.parse().map_err(|e| ConvertError::new("name", e))?,
    })
}

/// Checks every service of a snapshot or delta: the good ones, and a problem
/// for each bad one (the rest of the message is still used).
pub fn exports_from_proto(
    services: &[proto::ExportedService],
    field: &str,
    cluster: &ClusterName,
    limits: &PeeringLimits,
) -> (Vec<Export>, Vec<ConvertError>) {
    let mut good = Vec::with_capacity(services.len());
    let mut bad = Vec::new();
    for (i, s) in services.iter().enumerate() {
        match export_from_proto(s, cluster, limits) {
            Ok(e) => good.push(e),
            Err(e) => bad.push(e.within(&format!("{field}[{i}]"))),
        }
    }
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterName {
        "west".parse().unwrap()
    }

    fn sample() -> Export {
        Export {
            key: "shop/web".parse().unwrap(),
            ports: vec![ServicePort {
                port: 8080,
                protocol: Protocol::Grpc,
                name: Some("grpc".parse().unwrap()),
            }],
            export_time_millis: 42,
            headless: true,
            subsets: vec!["v2".into()],
            endpoints: vec![HeadlessEndpoint {
                cluster: cluster(),
                hostname: Some("web-0".parse().unwrap()),
                address: "10.0.0.7".parse().unwrap(),
            }],
        }
    }

    #[test]
    fn the_fuzz_seeds_are_the_messages_they_claim() {
        use prost::Message;
        use proto::peer_message::Kind;
        let decode = |bytes: &[u8]| proto::PeerMessage::decode(bytes).unwrap().kind.unwrap();
        let Kind::Hello(hello) = decode(include_bytes!("../../fuzz/seeds/peering_message/hello"))
        else {
            panic!("hello seed");
        };
        let id: SpiffeId = "spiffe://fuzz.example/isthmus/gateway/gw".parse().unwrap();
        assert_eq!(PeerHello::from_proto(&hello, &id).unwrap().incarnation, 42);
        let fuzz: ClusterName = "fuzz".parse().unwrap();
        let Kind::Snapshot(s) = decode(include_bytes!("../../fuzz/seeds/peering_message/snapshot"))
        else {
            panic!("snapshot seed");
        };
        let (good, bad) =
            exports_from_proto(&s.services, "services", &fuzz, &PeeringLimits::default());
        assert_eq!((good.len(), bad.len()), (2, 0), "{bad:?}");
        assert_eq!(good[1].endpoints.len(), 2);
        let Kind::Delta(d) = decode(include_bytes!("../../fuzz/seeds/peering_message/delta"))
        else {
            panic!("delta seed");
        };
        let (good, bad) =
            exports_from_proto(&d.upserts, "upserts", &fuzz, &PeeringLimits::default());
        assert_eq!((good.len(), bad.len(), d.removals.len()), (1, 1, 1));
    }

    #[test]
    fn exports_round_trip() {
        let wire = export_to_proto(&sample(), &cluster());
        assert_eq!(
            export_from_proto(&wire, &cluster(), &PeeringLimits::default()).unwrap(),
            sample()
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let good = export_to_proto(&sample(), &cluster());
        type Mutation = Box<dyn Fn(&mut proto::ExportedService)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.namespace = "Bad".into()), "namespace"),
            (Box::new(|s| s.ports[0].port = 70000), "ports[0].port"),
            (Box::new(|s| s.ports[0].port = 0), "ports[0].port"),
            (
                Box::new(|s| s.ports[0].protocol = "udp".into()),
                "ports[0].protocol",
            ),
            (Box::new(|s| s.ports[0].name = "_x".into()), "ports[0].name"),
            (
                Box::new(|s| s.ports.push(s.ports[0].clone())),
                "ports[1].port",
            ),
            (
                Box::new(|s| s.endpoints[0].address = "x".into()),
                "endpoints[0].address",
            ),
            (Box::new(|s| s.headless = false), "endpoints"),
            (
                Box::new(|s| s.origin_cluster = "east".into()),
                "origin_cluster",
            ),
        ];
        for (mutate, path) in cases {
            let mut wire = good.clone();
            mutate(&mut wire);
            let err = export_from_proto(&wire, &cluster(), &PeeringLimits::default()).unwrap_err();
            assert_eq!(err.path, path, "{err}");
        }
        let (ok, bad) = exports_from_proto(
            &[good.clone(), proto::ExportedService::default(), good],
            "services",
            &cluster(),
            &PeeringLimits::default(),
        );
        assert_eq!(ok.len(), 2);
        assert_eq!(bad[0].path, "services[1].namespace");
    }

    #[test]
    fn ports_endpoints_and_subsets_are_capped() {
        let limits = PeeringLimits {
            max_ports_per_service: 2,
            max_endpoints_per_service: 1,
            ..PeeringLimits::default()
        };
        let mut wire = export_to_proto(&sample(), &cluster());
        assert!(export_from_proto(&wire, &cluster(), &limits).is_ok());
        wire.ports = (1..=3)
            .map(|p| proto::ServicePort {
                port: p,
                protocol: "tcp".into(),
                name: String::new(),
            })
            .collect();
        let err = export_from_proto(&wire, &cluster(), &limits).unwrap_err();
        assert_eq!(err.path, "ports", "{err}");
        wire.ports.truncate(2);
        wire.endpoints.push(wire.endpoints[0].clone());
        let err = export_from_proto(&wire, &cluster(), &limits).unwrap_err();
        assert_eq!(err.path, "endpoints", "{err}");
        wire.endpoints.truncate(1);
        wire.subsets = (0..=MAX_SUBSETS).map(|i| format!("v{i}")).collect();
        let err = export_from_proto(&wire, &cluster(), &limits).unwrap_err();
        assert_eq!(err.path, "subsets", "{err}");
    }

    #[test]
    fn a_hello_must_come_from_a_gateway_identity() {
        let id: SpiffeId = "spiffe://west.example/ns/shop/sa/web".parse().unwrap();
        let mut wire = PeerHello {
            spiffe_id: "spiffe://west.example/isthmus/gateway/gw".parse().unwrap(),
            cluster: cluster(),
            locality: "eu".parse().unwrap(),
            east_west: None,
            incarnation: 1,
            lease: Duration::from_secs(10),
            labels: Labels::new(),
            weight: 1,
        }
        .to_proto();
        wire.spiffe_id = id.to_string();
        let err = PeerHello::from_proto(&wire, &id).unwrap_err();
        assert_eq!(err.path, "spiffe_id");
        assert!(err.message.contains("not a gateway identity"), "{err}");
    }

    #[test]
    fn a_hello_must_match_the_handshake_identity() {
        let id: SpiffeId = "spiffe://west.example/isthmus/gateway/gw".parse().unwrap();
        let hello = PeerHello {
            spiffe_id: id.clone(),
            cluster: cluster(),
            locality: "eu/eu-1a".parse().unwrap(),
            east_west: Some("127.0.0.1:15443".parse().unwrap()),
            incarnation: 7,
            lease: Duration::from_secs(10),
            labels: [("network".to_owned(), "n1".to_owned())].into(),
            weight: 3,
        };
        let wire = hello.to_proto();
        assert_eq!(PeerHello::from_proto(&wire, &id).unwrap(), hello);
        let other: SpiffeId = "spiffe://west.example/isthmus/gateway/other"
            .parse()
            .unwrap();
        assert_eq!(
            PeerHello::from_proto(&wire, &other).unwrap_err().path,
            "spiffe_id"
        );
        let mut bad = wire.clone();
        bad.trust_domain = "east.example".into();
        assert_eq!(
            PeerHello::from_proto(&bad, &id).unwrap_err().path,
            "trust_domain"
        );
        let mut bad = wire.clone();
        bad.protocol_version = 2;
        assert_eq!(
            PeerHello::from_proto(&bad, &id).unwrap_err().path,
            "protocol_version"
        );
        let mut bad = wire.clone();
        bad.lease_millis = 1;
        assert_eq!(
            PeerHello::from_proto(&bad, &id).unwrap_err().path,
            "lease_millis"
        );
        let mut bad = wire.clone();
        bad.weight = MAX_WEIGHT + 1;
        assert_eq!(
            PeerHello::from_proto(&bad, &id).unwrap_err().path,
            "weight"
        );
        // A sender that predates the weight counts once.
        let mut old = wire.clone();
        old.weight = 0;
        assert_eq!(PeerHello::from_proto(&old, &id).unwrap().weight, 1);
        let mut bad = wire;
        bad.locality = None;
        assert_eq!(
            PeerHello::from_proto(&bad, &id).unwrap_err().path,
            "locality.region"
        );
    }
}
