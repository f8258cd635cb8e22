//! Two clusters in two trust domains, federated: gateway A (`gw-a`,
//! a.example) and gateway B (`gw-b`, b.example), each trusting the other's
//! bundle, A with B as a static peer at B's east-west listener.
//!
//! [`TwoDomains`] is the PKI and the configuration pieces on their own, for
//! tests that start other shapes (several B's, one side only);
//! [`TwoClusters::builder`] starts both gateways with the per-test services
//! and options and waits until both are ready.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{DevPki, Gateway, free_addr, gateway_config};

/// Gateway A's SPIFFE ID.
pub const GW_A: &str = "spiffe://a.example/isthmus/gateway/gw-a";
/// Gateway B's SPIFFE ID.
pub const GW_B: &str = "spiffe://b.example/isthmus/gateway/gw-b";

/// How long each gateway of the pair may take to become ready.
const START: Duration = Duration::from_secs(20);

/// A development PKI with one CA per trust domain (`ca-a` for a.example,
/// `ca-b` for b.example) and the SVIDs of gateways A (`tls-a`) and B (`tls-b`).
pub struct TwoDomains {
    /// The PKI's directory, held so the files outlive the gateways.
    pub pki: DevPki,
    /// a.example's CA directory (`bundle.pem`, `ca.crt`, ...).
    pub ca_a: PathBuf,
    /// b.example's CA directory.
    pub ca_b: PathBuf,
    /// Gateway A's SVID directory (`svid.crt`, `svid.key`).
    pub tls_a: PathBuf,
    /// Gateway B's SVID directory.
    pub tls_b: PathBuf,
}

impl Default for TwoDomains {
    fn default() -> Self {
        Self::new()
    }
}

impl TwoDomains {
    /// Creates both CAs and issues both gateways' SVIDs.
    pub fn new() -> Self {
        let pki = DevPki::new();
        let ca_a = pki.ca("ca-a", "a.example");
        let ca_b = pki.ca("ca-b", "b.example");
        let tls_a = pki.issue(&ca_a, GW_A, "tls-a");
        let tls_b = pki.issue(&ca_b, GW_B, "tls-b");
        Self {
            pki,
            ca_a,
            ca_b,
            tls_a,
            tls_b,
        }
    }

    /// a.example's bundle.
    pub fn bundle_a(&self) -> PathBuf {
        self.ca_a.join("bundle.pem")
    }

    /// b.example's bundle.
    pub fn bundle_b(&self) -> PathBuf {
        self.ca_b.join("bundle.pem")
    }

    /// Gateway A's configuration: admin API on `admin`, b.example federated,
    /// then `extra`.
    pub fn a_config(&self, admin: SocketAddr, extra: &str) -> String {
        self.a_config_with(&self.tls_a, admin, extra)
    }

    /// [`Self::a_config`] with the SVID in `tls` instead of A's own.
    pub fn a_config_with(&self, tls: &Path, admin: SocketAddr, extra: &str) -> String {
        gateway_config(
            "gw-a",
            "a.example",
            admin,
            tls,
            &self.bundle_a(),
            &format!("{}{extra}", federated("b.example", &self.bundle_b())),
        )
    }

    /// [`Self::a_config`] with an outbound listener on `outbound` and the
    /// service shop/web (port 80); `extra` follows it, so it may go on with
    /// keys of that `[[services]]` table such as `endpoints`.
    pub fn a_outbound_config(
        &self,
        admin: SocketAddr,
        outbound: SocketAddr,
        extra: &str,
    ) -> String {
        self.a_config(
            admin,
            &format!(
                r#"[listeners]
outbound = "{outbound}"
[[services]]
namespace = "shop"
name = "web"
ports = [{{ port = 80 }}]
{extra}"#
            ),
        )
    }

    /// The configuration of gateway `name` in b.example with the SVID in
    /// `tls`: admin API on `admin`, a.example federated, then `extra`.
    pub fn b_config_of(&self, name: &str, tls: &Path, admin: SocketAddr, extra: &str) -> String {
        gateway_config(
            name,
            "b.example",
            admin,
            tls,
            &self.bundle_b(),
            &format!("{}{extra}", federated("a.example", &self.bundle_a())),
        )
    }

    /// Gateway B's configuration: [`Self::b_config_of`] `gw-b` with its SVID.
    pub fn b_config(&self, admin: SocketAddr, extra: &str) -> String {
        self.b_config_of("gw-b", &self.tls_b, admin, extra)
    }
}

/// A `[[trust.federated]]` entry trusting `td` with `bundle`.
pub fn federated(td: &str, bundle: &Path) -> String {
    format!(
        r#"[[trust.federated]]
trust_domain = "{td}"
bundle = "{}"
"#,
        bundle.display()
    )
}

/// A static `[[peers]]` entry: cluster `cluster` with `spiffe_id` at `address`
/// (locality `test`), with the `services` list when one is given.
pub fn peer(
    cluster: &str,
    spiffe_id: &str,
    address: SocketAddr,
    services: Option<&[&str]>,
) -> String {
    let mut toml = format!(
        r#"[[peers]]
cluster = "{cluster}"
spiffe_id = "{spiffe_id}"
address = "{address}"
locality = "test"
"#
    );
    if let Some(services) = services {
        let list: Vec<String> = services.iter().map(|s| format!("\"{s}\"")).collect();
        toml.push_str(&format!("services = [{}]\n", list.join(", ")));
    }
    toml
}

/// Writes `lines` numbered lines to a TCP echo behind `addr`, one at a time,
/// and asserts each comes back whole.
pub fn tcp_exchange(addr: SocketAddr, lines: usize) {
    let conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    for i in 0..lines {
        writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
        let mut back = String::new();
        reader.read_line(&mut back).unwrap();
        assert_eq!(back, format!("line {i}\n"));
    }
}

/// Gateways A and B running and ready.
pub struct TwoClusters {
    /// Gateway A.
    pub a: Gateway,
    /// Gateway B.
    pub b: Gateway,
    /// A's outbound listener (not configured under
    /// [`TwoClustersBuilder::without_outbound`]).
    pub outbound_a: SocketAddr,
    /// B's east-west listener, A's peer address for B.
    pub east_west_b: SocketAddr,
    /// The PKI both run on.
    pub domains: TwoDomains,
}

/// What differs between the tests that start A and B: see
/// [`TwoClusters::builder`].
pub struct TwoClustersBuilder {
    a_services: String,
    b_services: String,
    peer_services: Vec<String>,
    outbound: bool,
    b_peers_a: bool,
}

impl TwoClusters {
    /// A with an outbound listener and B as peer `gw-b-cluster`; B with an
    /// east-west listener. Both start with no services until given some.
    pub fn builder() -> TwoClustersBuilder {
        TwoClustersBuilder {
            a_services: String::new(),
            b_services: String::new(),
            peer_services: Vec::new(),
            outbound: true,
            b_peers_a: false,
        }
    }
}

impl TwoClustersBuilder {
    /// TOML added to A's configuration before its peer entry (its
    /// `[[services]]`, say), after what earlier calls added.
    pub fn a(mut self, toml: &str) -> Self {
        self.a_services.push_str(toml);
        self
    }

    /// TOML added to B's configuration after its east-west listener, after
    /// what earlier calls added.
    pub fn b(mut self, toml: &str) -> Self {
        self.b_services.push_str(toml);
        self
    }

    /// `services` added to the list A's peer entry for B has.
    pub fn peer_services(mut self, services: &[&str]) -> Self {
        self.peer_services
            .extend(services.iter().map(|s| (*s).to_owned()));
        self
    }

    /// The HTTP service shop/web (port 8080) across the pair: A asks B for
    /// it; B serves it from `endpoint`, exported.
    pub fn shop_web(self, endpoint: SocketAddr) -> Self {
        self.a(r#"[[services]]
namespace = "shop"
name = "web"
ports = [{ port = 8080 }]
"#)
            .peer_services(&["shop/web"])
            .b(&format!(
                r#"[[services]]
namespace = "shop"
name = "web"
ports = [{{ port = 8080 }}]
endpoints = ["{endpoint}"]
export = true
"#
            ))
    }

    /// The TCP service shop/db (port 5432) across the pair: A listens for it
    /// on `listen` and asks B for it; B serves it from `endpoint`, exported.
    pub fn shop_db(self, listen: SocketAddr, endpoint: SocketAddr) -> Self {
        self.a(&format!(
            r#"[[services]]
namespace = "shop"
name = "db"
ports = [{{ port = 5432, protocol = "tcp", listen = "{listen}" }}]
"#
        ))
        .peer_services(&["shop/db"])
        .b(&format!(
            r#"[[services]]
namespace = "shop"
name = "db"
ports = [{{ port = 5432, protocol = "tcp" }}]
endpoints = ["{endpoint}"]
export = true
"#
        ))
    }

    /// A gets no outbound listener (its TCP services listen on their own).
    pub fn without_outbound(mut self) -> Self {
        self.outbound = false;
        self
    }

    /// B has A as peer `gw-a-cluster` at A's outbound address (no services).
    pub fn b_peers_a(mut self) -> Self {
        self.b_peers_a = true;
        self
    }

    /// Starts B, then A, and waits for both to be ready.
    pub fn start(self) -> TwoClusters {
        let domains = TwoDomains::new();
        let (admin_a, admin_b, outbound_a, east_west_b) =
            (free_addr(), free_addr(), free_addr(), free_addr());
        let listeners = if self.outbound {
            format!("[listeners]\noutbound = \"{outbound_a}\"\n")
        } else {
            String::new()
        };
        let services: Vec<&str> = self.peer_services.iter().map(String::as_str).collect();
        let a = domains.a_config(
            admin_a,
            &format!(
                "{listeners}{}{}",
                self.a_services,
                peer("gw-b-cluster", GW_B, east_west_b, Some(&services))
            ),
        );
        let back = if self.b_peers_a {
            peer("gw-a-cluster", GW_A, outbound_a, None)
        } else {
            String::new()
        };
        let b = domains.b_config(
            admin_b,
            &format!(
                "[listeners]\neast_west = \"{east_west_b}\"\n{}\n{back}",
                self.b_services
            ),
        );
        let mut b = Gateway::start(&b, admin_b, &[]).unwrap();
        let mut a = Gateway::start(&a, admin_a, &[]).unwrap();
        b.wait_ready(START).unwrap();
        a.wait_ready(START).unwrap();
        TwoClusters {
            a,
            b,
            outbound_a,
            east_west_b,
            domains,
        }
    }
}
