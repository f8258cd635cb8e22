//! The shipped example federation, run from the shipped files themselves:
//! `config/examples/cluster-east.toml`, `cluster-west.toml` and `edge-vm.toml`
//! each start one gateway as they are. Only what differs between their hosts
//! and this one comes from the environment (`ISTHMUS__...` overrides, the way
//! an operator sets per-host values): listen addresses, the PKI that `isthmus
//! ca` makes in a temporary directory, and the real backends' addresses. The
//! trust domains, SPIFFE IDs, peers, accepts, imports and exports are the
//! files'. Then real clients: a workload in east calls west's HTTP service
//! (curl) and the VM's TCP service at the clusterset address its DNS gives
//! (dig), and the VM calls east's service the same way.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_tests::dns::dig;
use isthmus_tests::mesh::remote_clusters;
use isthmus_tests::two_clusters::tcp_exchange;
use isthmus_tests::{
    DevPki, EchoServer, Gateway, curl, free_addr, isthmus, metric_sum, served_by, tcp_echo,
    wait_for, workspace_root,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Probe, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

const START: Duration = Duration::from_secs(40);
const CONVERGE: Duration = Duration::from_secs(20);

/// One shipped file and what this host gives the gateway it starts.
struct Site {
    /// The file's name in `config/examples/`.
    file: &'static str,
    /// The file, parsed (for the names and the lists the overrides index).
    doc: toml::Table,
    /// Its clusterset range here: each gateway on one host needs its own.
    range: &'static str,
    /// Every address the file binds, by key (`listeners.outbound`), moved
    /// to a free loopback port.
    listen: HashMap<&'static str, SocketAddr>,
    /// `isthmus ca init` of its trust domain.
    ca: PathBuf,
    /// `isthmus ca issue` of its gateway's SPIFFE ID.
    tls: PathBuf,
}

/// The keys of the examples that bind an address.
const LISTEN_KEYS: [&str; 6] = [
    "admin.listen",
    "listeners.outbound",
    "listeners.east_west",
    "federation.listen",
    "trust.bundle_endpoint.listen",
    "dns.listen",
];

impl Site {
    fn new(file: &'static str, range: &'static str, pki: &DevPki) -> Self {
        let path = examples().join(file);
        let doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let listen = LISTEN_KEYS
            .into_iter()
            .filter(|key| get(&doc, key).is_some())
            .map(|key| (key, free_addr()))
            .collect();
        let (td, id) = (trust_domain(&doc), spiffe_id(&doc));
        let ca = pki.ca(&format!("{file}-ca"), &td);
        let tls = pki.issue(&ca, &id, &format!("{file}-svid"));
        Self {
            file,
            doc,
            range,
            listen,
            ca,
            tls,
        }
    }

    fn addr(&self, key: &str) -> SocketAddr {
        self.listen[key]
    }

    fn id(&self) -> String {
        spiffe_id(&self.doc)
    }

    /// The environment that runs this file on this host, beside `others`, with
    /// its services' endpoints at `backends` (by `namespace/name`) and its
    /// state files in `state`.
    fn env(
        &self,
        others: &[&Site],
        backends: &HashMap<String, Vec<SocketAddr>>,
        state: &Path,
    ) -> Vec<(String, String)> {
        let mut env = vec![
            var("identity.cert", self.tls.join("svid.crt").display()),
            var("identity.key", self.tls.join("svid.key").display()),
            var("identity.bundle", self.ca.join("bundle.pem").display()),
            var("dns.clusterset_ipv4_range", self.range),
            var("runtime.threads", 1),
        ];
        for (key, addr) in &self.listen {
            env.push(var(key, addr));
        }
        if get(&self.doc, "federation.advertise").is_some() {
            env.push(var(
                "federation.advertise",
                self.addr("listeners.east_west"),
            ));
        }
        for key in ["federation.state_file", "dns.state_file"] {
            if get(&self.doc, key).is_some() {
                let file = state.join(format!("{}-{key}.json", self.file));
                env.push(var(key, file.display()));
            }
        }
        let site_of = |pred: &dyn Fn(&Site) -> bool, what: &str| -> &Site {
            others
                .iter()
                .find(|s| pred(s))
                .unwrap_or_else(|| panic!("{}: no example is {what}", self.file))
        };
        for (i, fed) in tables(&self.doc, "trust.federated").iter().enumerate() {
            let td = fed["trust_domain"].as_str().unwrap();
            let other = site_of(&|s| trust_domain(&s.doc) == td, td);
            env.push(var(
                &format!("trust.federated[{i}].bundle"),
                other.ca.join("bundle.pem").display(),
            ));
            if fed.contains_key("endpoint_url") {
                let url = format!("https://{}/", other.addr("trust.bundle_endpoint.listen"));
                env.push(var(&format!("trust.federated[{i}].endpoint_url"), url));
            }
        }
        for (i, peer) in tables(&self.doc, "federation.peers").iter().enumerate() {
            let id = peer["spiffe_id"].as_str().unwrap();
            let other = site_of(&|s| s.id() == id, id);
            let addr = other.addr("federation.listen");
            env.push(var(&format!("federation.peers[{i}].address"), addr));
        }
        // The test started one backend for each endpoint the file lists.
        for (i, service) in tables(&self.doc, "services").iter().enumerate() {
            let mine = backends.get(&service_name(service)).into_iter().flatten();
            for (j, addr) in mine.enumerate() {
                env.push(var(&format!("services[{i}].endpoints[{j}]"), addr));
            }
        }
        env
    }

    /// Starts the gateway on the shipped file itself, with `env`.
    fn start(&self, env: &[(String, String)]) -> Gateway {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Gateway::start_file(&examples().join(self.file), self.addr("admin.listen"), &env).unwrap()
    }
}

fn examples() -> PathBuf {
    workspace_root().join("config/examples")
}

/// `ISTHMUS__A__B=value` for the dotted key `a.b` (`[i]` indexes a list).
fn var(key: &str, value: impl std::fmt::Display) -> (String, String) {
    let name = format!("ISTHMUS__{}", key.replace('.', "__").to_uppercase());
    (name, value.to_string())
}

/// The value at dotted `key` of `doc`.
fn get<'a>(doc: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let mut node = doc.get(first)?;
    for part in rest.split('.').filter(|p| !p.is_empty()) {
        node = node.get(part)?;
    }
    Some(node)
}

/// The tables of the array of tables at `key` (none when absent).
fn tables(doc: &toml::Table, key: &str) -> Vec<toml::Table> {
    get(doc, key)
        .and_then(toml::Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_table().cloned()).collect())
        .unwrap_or_default()
}

fn trust_domain(doc: &toml::Table) -> String {
    get(doc, "gateway.trust_domain")
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn spiffe_id(doc: &toml::Table) -> String {
    let name = get(doc, "gateway.name").unwrap().as_str().unwrap();
    format!("spiffe://{}/isthmus/gateway/{name}", trust_domain(doc))
}

fn service_name(service: &toml::Table) -> String {
    format!(
        "{}/{}",
        service["namespace"].as_str().unwrap(),
        service["name"].as_str().unwrap()
    )
}

/// Every address in `isthmus print-config`'s output for `file` with `env`:
/// none may be left outside loopback (tests touch nothing else).
fn assert_all_loopback(file: &str, env: &[(String, String)]) {
    let path = examples().join(file);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = isthmus(&["print-config", "--config", path.to_str().unwrap()], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for quoted in text.split('"').skip(1).step_by(2) {
        let ip = quoted
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| quoted.parse::<IpAddr>());
        if let Ok(ip) = ip {
            assert!(ip.is_loopback(), "{file}: {quoted} is left in:\n{text}");
        }
    }
}

/// The A record `name` has at the DNS server `dns`, once there is one.
fn resolve(dns: SocketAddr, name: &str) -> IpAddr {
    wait_for(CONVERGE, &format!("{name} in the DNS at {dns}"), || {
        dig(dns, &[name, "A"]).data("A").first()?.parse().ok()
    })
    .unwrap()
}

#[test]
fn shipped_examples_federate_two_clusters_and_a_vm() {
    let pki = DevPki::new();
    let east = Site::new("cluster-east.toml", "127.250.1.0/24", &pki);
    let west = Site::new("cluster-west.toml", "127.250.2.0/24", &pki);
    let vm = Site::new("edge-vm.toml", "127.250.3.0/24", &pki);
    let sites = [&east, &west, &vm];

    // Real backends, as many as each file lists: HTTP echoes naming
    // themselves, and a TCP echo for TCP services.
    let mut echoes = Vec::new();
    let mut backends: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    for site in sites {
        for service in tables(&site.doc, "services") {
            let name = service_name(&service);
            let tcp = service["ports"].as_array().unwrap()[0].get("protocol")
                == Some(&toml::Value::from("tcp"));
            let count = service
                .get("endpoints")
                .and_then(|e| e.as_array())
                .map_or(0, Vec::len);
            for j in 0..count {
                let addr = if tcp {
                    tcp_echo()
                } else {
                    let echo = EchoServer::start(&format!("{}:{name}#{j}", site.file));
                    let addr = echo.addr;
                    echoes.push(echo);
                    addr
                };
                backends.entry(name.clone()).or_default().push(addr);
            }
        }
    }

    let state = tempfile::tempdir().unwrap();
    let envs: Vec<Vec<(String, String)>> = sites
        .iter()
        .map(|site| site.env(&sites, &backends, state.path()))
        .collect();
    for (site, env) in sites.iter().zip(&envs) {
        assert_all_loopback(site.file, env);
    }
    let mut gateways: Vec<Gateway> = sites
        .iter()
        .zip(&envs)
        .map(|(site, env)| site.start(env))
        .collect();
    for gw in &mut gateways {
        gw.wait_ready(START).unwrap();
    }
    let (east_gw, west_gw, vm_gw) = (&gateways[0], &gateways[1], &gateways[2]);

    // Peering brought each side the others' exports, with no [[services]]
    // entry for them.
    for (gw, service, cluster) in [
        (east_gw, "shop/catalog", "prod-west"),
        (east_gw, "billing/ledger", "vm-fleet"),
        (west_gw, "shop/web", "prod-east"),
        (west_gw, "billing/ledger", "vm-fleet"),
        (vm_gw, "shop/web", "prod-east"),
        (vm_gw, "shop/catalog", "prod-west"),
    ] {
        wait_for(CONVERGE, &format!("{service} from {cluster}"), || {
            (remote_clusters(gw, service)? == [cluster]).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}:\n{}", gw.admin_json("/debug/catalog")));
    }

    // The VM follows both clusters' bundles at their bundle endpoints.
    for td in ["prod-east.example.org", "prod-west.example.org"] {
        wait_for(CONVERGE, &format!("a fetch of {td}'s bundle"), || {
            let metrics = vm_gw.admin_get("/metrics").body;
            let fetched = |result| {
                let labels = [("trust_domain", td), ("result", result)];
                metric_sum(&metrics, "isthmus_trust_bundle_fetches_total", &labels)
            };
            (fetched("updated") + fetched("unchanged") > 0.0).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}:\n{}", vm_gw.log()));
    }

    // A workload in east calls west's HTTP service through east's outbound listener.
    let outbound = east.addr("listeners.outbound");
    let catalog = wait_for(CONVERGE, "shop/catalog through east", || {
        let r = curl(&[
            "-H",
            "Host: catalog.shop.svc.clusterset.local:8080",
            &format!("http://{outbound}/items"),
        ]);
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", east_gw.log()));
    assert!(
        served_by(&catalog).starts_with("cluster-west.toml:shop/catalog#"),
        "{catalog:?}"
    );

    // ...and the VM's TCP service at the clusterset IP east's DNS gives it.
    let ledger = resolve(
        east.addr("dns.listen"),
        "ledger.billing.svc.clusterset.local",
    );
    assert!(ledger.to_string().starts_with("127.250.1."), "{ledger}");
    let srv = dig(
        east.addr("dns.listen"),
        &["_postgres._tcp.ledger.billing.svc.clusterset.local", "SRV"],
    );
    assert_eq!(
        srv.data("SRV"),
        ["0 100 5432 ledger.billing.svc.clusterset.local."],
        "{}",
        srv.raw
    );
    let ledger = SocketAddr::new(ledger, 5432);
    wait_for(
        CONVERGE,
        "east's clusterset listener for billing/ledger",
        || TcpStream::connect(ledger).ok(),
    )
    .unwrap();
    tcp_exchange(ledger, 3);

    // The VM calls east's service at the clusterset IP its own DNS gives it.
    let web = resolve(vm.addr("dns.listen"), "web.shop.svc.clusterset.local");
    let url = format!("http://{web}:8080/");
    let answer = wait_for(CONVERGE, "shop/web through the VM", || {
        let r = curl(&[&url]);
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", vm_gw.log()));
    assert!(
        served_by(&answer).starts_with("cluster-east.toml:shop/web#"),
        "{answer:?}"
    );
}

/// `config/examples/kubernetes/prod-east-borders.yaml`'s objects, parsed as
/// the Kubernetes types they declare (not applied: no API server runs here).
struct BorderManifests {
    config: ConfigMap,
    deployment: Deployment,
    budget: PodDisruptionBudget,
}

fn border_manifests() -> BorderManifests {
    let path = examples().join("kubernetes/prod-east-borders.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (mut config, mut deployment, mut budget) = (None, None, None);
    // Documents are separated by `---` lines; the first holds only comments.
    for doc in text.split("\n---\n") {
        let doc: serde_json::Value = serde_yaml::from_str(doc).unwrap();
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap().to_owned();
        let what = format!("{kind} {} of {}", doc["metadata"]["name"], path.display());
        match kind.as_str() {
            "ConfigMap" => config = Some(typed(doc, &what)),
            "Deployment" => deployment = Some(typed(doc, &what)),
            "PodDisruptionBudget" => budget = Some(typed(doc, &what)),
            "Service" => {
                let _: Service = typed(doc, &what);
            }
            other => panic!("{}: unexpected kind {other}", path.display()),
        }
    }
    BorderManifests {
        config: config.expect("a ConfigMap"),
        deployment: deployment.expect("a Deployment"),
        budget: budget.expect("a PodDisruptionBudget"),
    }
}

/// `doc` as the Kubernetes type `T`; `what` names it when it is not one.
fn typed<T: k8s_openapi::serde::de::DeserializeOwned>(doc: serde_json::Value, what: &str) -> T {
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `value` with `$(NAME)` replaced from `vars`, as the kubelet expands a
/// container's environment.
fn expand(value: &str, vars: &[(String, String)]) -> String {
    vars.iter().fold(value.to_owned(), |v, (name, val)| {
        v.replace(&format!("$({name})"), val)
    })
}

#[test]
fn kubernetes_example_runs_replicas_each_with_its_own_identity_and_address() {
    let m = border_manifests();
    let spec = m.deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2), "two replicas");
    let pod = spec.template.spec.as_ref().unwrap();
    let labels = spec.template.metadata.as_ref().unwrap().labels.clone();
    // Replicas on separate nodes, and a drain takes one at a time.
    let anti = pod
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let required = anti
        .required_during_scheduling_ignored_during_execution
        .as_ref();
    assert!(
        required
            .unwrap()
            .iter()
            .any(|t| t.topology_key == "kubernetes.io/hostname"),
        "one replica per node"
    );
    let budget = m.budget.spec.unwrap();
    assert_eq!(budget.min_available, Some(IntOrString::Int(1)));
    assert_eq!(budget.selector.unwrap().match_labels, labels);
    let container = &pod.containers[0];
    let probe = |p: &Option<Probe>| {
        let exec = p.as_ref().unwrap().exec.as_ref().unwrap();
        exec.command.clone().unwrap().join(" ")
    };
    assert!(
        probe(&container.readiness_probe).ends_with("isthmus probe http://127.0.0.1:15000/readyz")
    );
    assert!(
        probe(&container.liveness_probe).ends_with("isthmus probe http://127.0.0.1:15000/healthz")
    );
    // Each replica is reached at its own node's address: hostPorts.
    let host_ports: Vec<i32> = container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.host_port)
        .collect();
    assert_eq!(host_ports, [15443, 15012]);
    let toml_text = m.config.data.as_ref().unwrap()["isthmus.toml"].clone();

    // Two pods as the Deployment makes them: the downward API gives each its
    // name and its node's IP; the container's ISTHMUS__ variables follow.
    // What differs between their hosts and this one (file paths, the PKI)
    // comes from further overrides, as in the test above.
    let pki = DevPki::new();
    let td = "prod-east.example.org";
    let ca = pki.ca("prod-east-ca", td);
    let west_ca = pki.ca("prod-west-ca", "prod-west.example.org");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("isthmus.toml");
    std::fs::write(&config, &toml_text).unwrap();
    let config = config.to_str().unwrap();
    for (pod_name, host_ip) in [
        ("isthmus-border-6b7f9c5d4-x2k8p", "127.0.0.1"),
        ("isthmus-border-6b7f9c5d4-q9w4z", "127.0.0.2"),
    ] {
        let mut vars: Vec<(String, String)> = Vec::new();
        for e in container.env.iter().flatten() {
            let value = match e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
                Some(f) if f.field_path == "metadata.name" => pod_name.to_owned(),
                Some(f) if f.field_path == "status.hostIP" => host_ip.to_owned(),
                Some(f) => panic!("no downward API value here for {}", f.field_path),
                None => expand(e.value.as_deref().unwrap_or(""), &vars),
            };
            vars.push((e.name.clone(), value));
        }
        let id = format!("spiffe://{td}/isthmus/gateway/{pod_name}");
        let tls = pki.issue(&ca, &id, pod_name);
        let state = dir.path().join(format!("{pod_name}-state.json"));
        let mut env: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("ISTHMUS__"))
            .collect();
        env.extend([
            var("identity.cert", tls.join("svid.crt").display()),
            var("identity.key", tls.join("svid.key").display()),
            var("identity.bundle", ca.join("bundle.pem").display()),
            var(
                "trust.federated[0].bundle",
                west_ca.join("bundle.pem").display(),
            ),
            var("federation.state_file", state.display()),
        ]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = isthmus(&["check-config", "--config", config], &env);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{pod_name}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            said.contains(&format!("gateway {pod_name}, cluster prod-east, {id}")),
            "{said}"
        );
        let out = isthmus(&["print-config", "--config", config], &env);
        let printed: toml::Table = String::from_utf8_lossy(&out.stdout).parse().unwrap();
        assert_eq!(
            get(&printed, "federation.advertise").and_then(toml::Value::as_str),
            Some(format!("{host_ip}:15443").as_str()),
            "{printed}"
        );
    }
}
