//! A test federation: gateways that each trust every other's domain and
//! peer over `isthmus.federation.v1`, with helpers to read their catalogs.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

use crate::two_clusters::federated;
use crate::{DevPki, Gateway, free_addr, gateway_config};

/// One gateway of a test federation; cluster `<name>-cluster`, trust domain
/// `<name>.example`.
pub struct Member {
    /// Its name: gateway `gw-<name>`, cluster `gw-<name>-cluster`.
    pub name: String,
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
    /// Its trust domain, `<name>.example`.
    pub fn td(&self) -> String {
        format!("{}.example", self.name)
    }
    /// Its cluster, `gw-<name>-cluster`.
    pub fn cluster(&self) -> String {
        format!("gw-{}-cluster", self.name)
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

    /// Puts member `i` in `region` and, when given, `zone`.
    pub fn set_locality(&mut self, i: usize, region: &str, zone: Option<&str>) {
        self.members[i].locality = (region.to_owned(), zone.map(str::to_owned));
    }

    /// Member `i`'s configuration with `services` (TOML) appended; it dials
    /// the members in `dials`.
    pub fn config(&self, i: usize, dials: &[usize], services: &str) -> String {
        let me = &self.members[i];
        let mut extra = String::new();
        for (j, other) in self.members.iter().enumerate() {
            if j != i {
                extra.push_str(&federated(&other.td(), &other.ca.join("bundle.pem")));
            }
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
        // cluster name, as gateways of its trust domain.
        for (j, other) in self.members.iter().enumerate() {
            if j != i && !dials.contains(&j) {
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
        config.replacen(default, &locality, 1)
    }

    /// Every member dials every other.
    pub fn full_config(&self, i: usize, services: &str) -> String {
        let others: Vec<usize> = (0..self.members.len()).filter(|j| *j != i).collect();
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
