//! The demo federation's members, their PKI and their gateway configuration.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use isthmus_federation::trust::ca::{DEFAULT_CA_VALIDITY, DEFAULT_SVID_VALIDITY};
use isthmus_federation::{SpiffeId, TrustDomain};

use crate::devpki;

/// Admin API port (the default of `admin.listen`).
pub(super) const ADMIN_PORT: u16 = 15000;
/// Outbound listener port.
pub(super) const OUTBOUND_PORT: u16 = 15001;
/// Federation (peering) port.
pub(super) const FEDERATION_PORT: u16 = 15012;
/// DNS port.
pub(super) const DNS_PORT: u16 = 15053;
/// East-west listener port.
pub(super) const EAST_WEST_PORT: u16 = 15443;
/// The service port every demo service listens on.
pub(super) const SERVICE_PORT: u16 = 8080;
/// The demo services' namespace.
pub(super) const NAMESPACE: &str = "demo";

/// One gateway of the demo federation.
#[derive(Debug)]
pub(super) struct MemberSpec {
    /// The gateway's name (also the control API's name for it).
    pub(super) name: &'static str,
    /// The cluster (or VM fleet) it fronts.
    pub(super) cluster: &'static str,
    /// `cluster` or `vm`, for the guide.
    pub(super) kind: &'static str,
    /// Its own trust domain.
    pub(super) trust_domain: &'static str,
    /// Locality.
    pub(super) region: &'static str,
    /// Locality.
    pub(super) zone: &'static str,
    /// Its own loopback address, so it can use the standard ports.
    pub(super) ip: Ipv4Addr,
    /// Its clusterset IP range: gateways on one machine must not share one, or
    /// their clusterset listeners would collide.
    pub(super) clusterset_range: &'static str,
}

impl MemberSpec {
    /// The gateway's SPIFFE ID.
    pub(super) fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/isthmus/gateway/{}",
            self.trust_domain, self.name
        )
    }

    /// `ip:port` of this member.
    pub(super) fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// Every address it listens on, with what it is (for the port check).
    pub(super) fn listen_addrs(&self) -> [(&'static str, SocketAddr); 5] {
        [
            ("admin", self.addr(ADMIN_PORT)),
            ("outbound", self.addr(OUTBOUND_PORT)),
            ("federation", self.addr(FEDERATION_PORT)),
            ("DNS", self.addr(DNS_PORT)),
            ("east-west", self.addr(EAST_WEST_PORT)),
        ]
    }
}

/// The three members: two clusters in two regions and one VM gateway.
pub(super) const MEMBERS: [MemberSpec; 3] = [
    MemberSpec {
        name: "east",
        cluster: "east",
        kind: "cluster",
        trust_domain: "east.demo",
        region: "us-east",
        zone: "us-east-1a",
        ip: Ipv4Addr::new(127, 0, 10, 1),
        clusterset_range: "127.241.10.0/24",
    },
    MemberSpec {
        name: "west",
        cluster: "west",
        kind: "cluster",
        trust_domain: "west.demo",
        region: "eu-west",
        zone: "eu-west-1a",
        ip: Ipv4Addr::new(127, 0, 20, 1),
        clusterset_range: "127.241.20.0/24",
    },
    MemberSpec {
        name: "vm",
        cluster: "vm-edge",
        kind: "VM",
        trust_domain: "vm.demo",
        region: "us-east",
        zone: "us-east-1b",
        ip: Ipv4Addr::new(127, 0, 30, 1),
        clusterset_range: "127.241.30.0/24",
    },
];

/// One demo endpoint: which member serves which service, in which version.
#[derive(Debug)]
pub(super) struct EndpointSpec {
    /// Index into [`MEMBERS`].
    pub(super) member: usize,
    /// Service name (namespace [`NAMESPACE`]).
    pub(super) service: &'static str,
    /// Version label it reports (and, once labels exist, carries).
    pub(super) version: &'static str,
}

/// Every demo endpoint: `hello` everywhere, `checkout` v1 in both clusters and
/// v2 in east.
pub(super) const ENDPOINTS: [EndpointSpec; 6] = [
    EndpointSpec {
        member: 0,
        service: "hello",
        version: "v1",
    },
    EndpointSpec {
        member: 1,
        service: "hello",
        version: "v1",
    },
    EndpointSpec {
        member: 2,
        service: "hello",
        version: "v1",
    },
    EndpointSpec {
        member: 0,
        service: "checkout",
        version: "v1",
    },
    EndpointSpec {
        member: 1,
        service: "checkout",
        version: "v1",
    },
    EndpointSpec {
        member: 0,
        service: "checkout",
        version: "v2",
    },
];

/// A running demo endpoint: its spec and where it listens.
#[derive(Debug, Clone, Copy)]
pub(super) struct Endpoint {
    /// What it is.
    pub(super) spec: &'static EndpointSpec,
    /// Where it listens (127.0.0.1, a free port).
    pub(super) addr: SocketAddr,
}

/// A member's files inside the work directory.
#[derive(Debug, Clone)]
pub(super) struct MemberFiles {
    /// `<work>/<name>`
    pub(super) dir: PathBuf,
    /// `<work>/<name>/isthmus.toml`
    pub(super) config: PathBuf,
    /// `<work>/<name>/isthmus.log`
    pub(super) log: PathBuf,
}

impl MemberFiles {
    /// The files of `spec` under `work`.
    pub(super) fn new(work: &Path, spec: &MemberSpec) -> Self {
        let dir = work.join(spec.name);
        Self {
            config: dir.join("isthmus.toml"),
            log: dir.join("isthmus.log"),
            dir,
        }
    }
}

/// Development PKI: one CA per trust domain in `<work>/<name>/ca`, one gateway
/// SVID in `<work>/<name>/svid`.
pub(super) fn make_pki(work: &Path) -> Result<(), String> {
    for spec in &MEMBERS {
        let dir = work.join(spec.name);
        let td: TrustDomain = spec
            .trust_domain
            .parse()
            .map_err(|e| format!("trust domain {}: {e}", spec.trust_domain))?;
        let id: SpiffeId = spec
            .spiffe_id()
            .parse()
            .map_err(|e| format!("SPIFFE ID {}: {e}", spec.spiffe_id()))?;
        devpki::init(&td, &dir.join("ca"), DEFAULT_CA_VALIDITY, true).map_err(|e| e.to_string())?;
        devpki::issue(
            &dir.join("ca"),
            &id,
            &dir.join("svid"),
            DEFAULT_SVID_VALIDITY,
            true,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The gateway configuration of member `i`. Paths are relative to the
/// configuration file's directory (`<work>/<name>/`).
pub(super) fn gateway_toml(i: usize, endpoints: &[Endpoint]) -> String {
    let me = &MEMBERS[i];
    let mut t = format!(
        r#"# Written by `isthmus demo`: the {kind} gateway {name}.
[gateway]
name = "{name}"
cluster = "{cluster}"
trust_domain = "{td}"

[gateway.locality]
region = "{region}"
zone = "{zone}"

[identity]
cert = "svid/{cert}"
key = "svid/{key}"
bundle = "ca/{bundle}"
"#,
        kind = me.kind,
        name = me.name,
        cluster = me.cluster,
        td = me.trust_domain,
        region = me.region,
        zone = me.zone,
        cert = devpki::SVID_CERT,
        key = devpki::SVID_KEY,
        bundle = devpki::BUNDLE_PEM,
    );
    for (j, other) in MEMBERS.iter().enumerate() {
        if j != i {
            let _ = write!(
                t,
                "\n[[trust.federated]]\ntrust_domain = \"{}\"\nbundle = \"../{}/ca/{}\"\n",
                other.trust_domain,
                other.name,
                devpki::BUNDLE_PEM
            );
        }
    }
    let _ = write!(
        t,
        r#"
[admin]
listen = "{admin}"

[log]
level = "info"
format = "json"

[runtime]
threads = 1

[shutdown]
drain_timeout = "1s"

[listeners]
outbound = "{outbound}"
east_west = "{east_west}"

# The default lease (1.5 s) takes a stopped cluster out of traffic at once; a
# short grace removes its services from the catalogs within seconds too.
[federation]
listen = "{federation}"
grace = "5s"
"#,
        admin = me.addr(ADMIN_PORT),
        outbound = me.addr(OUTBOUND_PORT),
        east_west = me.addr(EAST_WEST_PORT),
        federation = me.addr(FEDERATION_PORT),
    );
    for (j, other) in MEMBERS.iter().enumerate() {
        if j != i {
            let _ = write!(
                t,
                "\n[[federation.peers]]\naddress = \"{}\"\nspiffe_id = \"{}\"\nclusters = [\"{}\"]\n",
                other.addr(FEDERATION_PORT),
                other.spiffe_id(),
                other.cluster
            );
        }
    }
    let _ = write!(
        t,
        r#"
[dns]
listen = "{dns}"
clusterset_ipv4_range = "{range}"
state_file = "dns-state.json"
"#,
        dns = me.addr(DNS_PORT),
        range = me.clusterset_range,
    );
    for service in ["hello", "checkout"] {
        let mine: Vec<Endpoint> = endpoints
            .iter()
            .filter(|e| e.spec.member == i && e.spec.service == service)
            .copied()
            .collect();
        if !mine.is_empty() {
            t.push('\n');
            t.push_str(&service_toml(service, &mine));
        }
    }
    t.push('\n');
    t.push_str(CHECKOUT_ROUTES);
    t
}

/// The canary of `demo/checkout`, on every gateway (routes apply where a
/// request enters the mesh): `x-canary: true` goes to v2; the rest is split
/// v1 90 % / v2 10 %. Only east has v2, so v2's share goes there from
/// anywhere; while east is down it goes to v1 (a split never fails a request
/// that something else can serve).
const CHECKOUT_ROUTES: &str = r#"[[routes]]
service = "demo/checkout"
[[routes.rules]]
headers = [{ name = "x-canary", exact = "true" }]
split = [{ subset = "v2", weight = 100 }]
[[routes.rules]]
split = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]
"#;

/// Each demo service's `[[services]]` table: one member's endpoints of
/// `service`, labelled with their version, subsets v1 and v2 by that label,
/// exported to the federation.
pub(super) fn service_toml(service: &str, endpoints: &[Endpoint]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|e| {
            format!(
                "{{ address = \"{}\", labels = {{ version = \"{}\" }} }}",
                e.addr, e.spec.version
            )
        })
        .collect();
    format!(
        "[[services]]\nnamespace = \"{ns}\"\nname = \"{service}\"\nports = [{{ port = {port}, name = \"http\" }}]\nendpoints = [{endpoints}]\nsubsets = [{{ name = \"v1\", labels = {{ version = \"v1\" }} }}, {{ name = \"v2\", labels = {{ version = \"v2\" }} }}]\nexport = true\n",
        ns = NAMESPACE,
        port = SERVICE_PORT,
        endpoints = endpoints.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_config_is_valid_with_its_pki() {
        let work = tempfile::tempdir().unwrap();
        make_pki(work.path()).unwrap();
        let endpoints: Vec<Endpoint> = ENDPOINTS
            .iter()
            .enumerate()
            .map(|(i, spec)| Endpoint {
                spec,
                addr: SocketAddr::from(([127, 0, 0, 1], 20000 + u16::try_from(i).unwrap())),
            })
            .collect();
        for (i, spec) in MEMBERS.iter().enumerate() {
            let files = MemberFiles::new(work.path(), spec);
            std::fs::write(&files.config, gateway_toml(i, &endpoints)).unwrap();
            let crate::server::Loaded { config, trust, .. } =
                crate::server::load(&files.config, prometheus::Registry::new())
                    .unwrap_or_else(|e| panic!("{}: {e:?}", spec.name));
            assert!(trust.is_some(), "{} has an identity", spec.name);
            assert_eq!(config.spiffe_id().to_string(), spec.spiffe_id());
            let services = config.services.len();
            assert_eq!(services, if i == 2 { 1 } else { 2 }, "{}", spec.name);
            assert_eq!(config.routes.len(), 1, "{}: the checkout canary", spec.name);
        }
    }
}
