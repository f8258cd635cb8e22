//! A test federation: gateways that each trust every other's domain and
//! peer over `isthmus.federation.v1`, with helpers to read their catalogs.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

use crate::two_clusters::federated;
use crate::{DevPki, Gateway, free_addr, gateway_config};

/// One gateway of a test federation; cluster `gw-<domain>-cluster`, trust
/// domain `<domain>.example`.
pub struct Member {
    /// Its name: gateway `gw-<name>`.
    pub name: String,
    /// Its trust domain's and cluster's name: its own name, or for a replica
    /// ([`Mesh::add_replica`]) the name of the member it is a replica of.
    pub domain: String,
    /// Its trust domain's CA directory.
    pub ca: PathBuf,
    /// Its SVID directory.
    pub tls: PathBuf,
    /// Admin API.
    pub admin: SocketAddr,
    /// Outbound listener.
    pub outbound: SocketAddr,
    /// East-west listener.
    pub east_west: SocketAddr,
    /// Federation listener.
    pub federation: SocketAddr,
    /// `[gateway.locality]`: region (`test` unless set) and zone.
    pub locality: (String, Option<String>),
}

impl Member {
    /// Its trust domain, `<domain>.example`.
    pub fn td(&self) -> String {
        format!("{}.example", self.domain)
    }
    /// Its cluster, `gw-<domain>-cluster`.
    pub fn cluster(&self) -> String {
        format!("gw-{}-cluster", self.domain)
    }
    /// Its SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}/isthmus/gateway/gw-{}", self.td(), self.name)
    }
}

/// Gateways that each federate every other's trust domain and dial every
/// other; leases of 1 s and a grace of 1 s keep expiry quick (unless
/// `leases` is set to `None`: the defaults).
pub struct Mesh {
    /// Holds the certificates' directory for the test's lifetime.
    _pki: DevPki,
    /// The gateways.
    pub members: Vec<Member>,
    /// `federation.lease` and `federation.grace`, or the defaults when `None`.
    pub leases: Option<(&'static str, &'static str)>,
}

impl Mesh {
    /// A mesh of gateways named `names`, with their PKI.
    pub fn new(names: &[&str]) -> Self {
        let pki = DevPki::new();
        let members = names
            .iter()
            .map(|name| {
                let ca = pki.ca(&format!("ca-{name}"), &format!("{name}.example"));
                let tls = pki.issue(
                    &ca,
                    &format!("spiffe://{name}.example/isthmus/gateway/gw-{name}"),
                    &format!("tls-{name}"),
                );
                Member {
                    name: (*name).to_owned(),
                    domain: (*name).to_owned(),
                    ca,
                    tls,
                    admin: free_addr(),
                    outbound: free_addr(),
                    east_west: free_addr(),
                    federation: free_addr(),
                    locality: ("test".to_owned(), None),
                }
            })
            .collect();
        Self {
            _pki: pki,
            members,
            leases: Some(("1s", "1s")),
        }
    }

    /// Adds gateway `gw-<name>`, a replica of member `of`: another gateway of
    /// its cluster, with its trust domain, locality and exports, but its own
    /// SPIFFE ID (issued by the same CA) and addresses. Replicas of one
    /// cluster do not peer with each other. Returns its index.
    pub fn add_replica(&mut self, of: usize, name: &str) -> usize {
        let original = &self.members[of];
        let tls = self._pki.issue(
            &original.ca,
            &format!("spiffe://{}/isthmus/gateway/gw-{name}", original.td()),
            &format!("tls-{name}"),
        );
        let replica = Member {
            name: name.to_owned(),
            domain: original.domain.clone(),
            ca: original.ca.clone(),
            tls,
            admin: free_addr(),
            outbound: free_addr(),
            east_west: free_addr(),
            federation: free_addr(),
            locality: original.locality.clone(),
        };
        self.members.push(replica);
        self.members.len() - 1
    }

    /// Puts member `i` in `region` and, when given, `zone`.
    pub fn set_locality(&mut self, i: usize, region: &str, zone: Option<&str>) {
        self.members[i].locality = (region.to_owned(), zone.map(str::to_owned));
    }

    /// Member `i`'s configuration with `services` (TOML) appended; it dials
    /// the members in `dials`.
    pub fn config(&self, i: usize, dials: &[usize], services: &str) -> String {
        let me = &self.members[i];
        let mut extra = String::new();
        // Other clusters, once each however many replicas they have.
        let mut others: Vec<&Member> = Vec::new();
        for other in &self.members {
            if other.domain != me.domain && others.iter().all(|o| o.domain != other.domain) {
                others.push(other);
            }
        }
        for other in &others {
            extra.push_str(&federated(&other.td(), &other.ca.join("bundle.pem")));
        }
        extra.push_str(&format!(
            "[listeners]\noutbound = \"{}\"\neast_west = \"{}\"\n[federation]\nlisten = \"{}\"\n",
            me.outbound, me.east_west, me.federation
        ));
        if let Some((lease, grace)) = self.leases {
            extra.push_str(&format!("lease = \"{lease}\"\ngrace = \"{grace}\"\n"));
        }
        for &j in dials {
            let peer = &self.members[j];
            extra.push_str(&format!(
                "[[federation.peers]]\naddress = \"{}\"\nspiffe_id = \"{}\"\nclusters = [\"{}\"]\n",
                peer.federation,
                peer.spiffe_id(),
                peer.cluster()
            ));
        }
        // The members it does not dial may dial it: each is granted its own
        // cluster name, as gateways of its trust domain (any of its replicas).
        for other in &others {
            let all_dialled = (0..self.members.len())
                .filter(|j| self.members[*j].domain == other.domain)
                .all(|j| dials.contains(&j));
            if !all_dialled {
                extra.push_str(&format!(
                    "[[federation.accept]]\ntrust_domain = \"{}\"\nclusters = [\"{}\"]\n",
                    other.td(),
                    other.cluster()
                ));
            }
        }
        extra.push_str(services);
        let config = gateway_config(
            &format!("gw-{}", me.name),
            &me.td(),
            me.admin,
            &me.tls,
            &me.ca.join("bundle.pem"),
            &extra,
        );
        let (region, zone) = &me.locality;
        let mut locality = format!("[gateway.locality]\nregion = \"{region}\"\n");
        if let Some(zone) = zone {
            locality.push_str(&format!("zone = \"{zone}\"\n"));
        }
        let default = "[gateway.locality]\nregion = \"test\"\n";
        assert!(config.contains(default), "gateway_config's locality moved");
        let config = config.replacen(default, &locality, 1);
        // gateway_config names the cluster after the gateway; a replica's is
        // its original's.
        let named = format!("cluster = \"gw-{}-cluster\"\n", me.name);
        assert!(config.contains(&named), "gateway_config's cluster moved");
        config.replacen(&named, &format!("cluster = \"{}\"\n", me.cluster()), 1)
    }

    /// Every member dials every other (but not its own replicas).
    pub fn full_config(&self, i: usize, services: &str) -> String {
        let domain = &self.members[i].domain;
        let others: Vec<usize> = (0..self.members.len())
            .filter(|j| self.members[*j].domain != *domain)
            .collect();
        self.config(i, &others, services)
    }
}

/// shop/`name` on port 80 at `endpoint`, exported.
pub fn shop_service(name: &str, endpoint: SocketAddr) -> String {
    format!(
        "[[services]]\nnamespace = \"shop\"\nname = \"{name}\"\nports = [{{ port = 80 }}]\nendpoints = [\"{endpoint}\"]\nexport = true\n"
    )
}

/// shop/web on port 8080 (named `http`) at `endpoint`, exported or not.
pub fn web_service(endpoint: SocketAddr, export: bool) -> String {
    format!(
        "[[services]]\nnamespace = \"shop\"\nname = \"web\"\nports = [{{ port = 8080, name = \"http\" }}]\nendpoints = [\"{endpoint}\"]\nexport = {export}\n"
    )
}

/// The clusters serving `service` in `gw`'s catalog (`None`: not in it).
pub fn remote_clusters(gw: &Gateway, service: &str) -> Option<Vec<String>> {
    let catalog = gw.admin_json("/debug/catalog");
    let entry = catalog["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == service)?
        .clone();
    Some(
        entry["remote"]
            .as_array()?
            .iter()
            .filter_map(|r| r["cluster"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Peer `spiffe_id` in a `/debug/peers` document.
pub fn peer<'a>(peers: &'a Value, spiffe_id: &str) -> Option<&'a Value> {
    peers["peers"]
        .as_array()?
        .iter()
        .find(|p| p["spiffe_id"] == spiffe_id)
}

/// Writes `config` and sends SIGHUP.
pub fn reload(gw: &Gateway, config: &str) -> Result<()> {
    std::fs::write(gw.config_path(), config)?;
    gw.signal("HUP")
}
