//! Kubernetes discovery: `v1` Services, `discovery.k8s.io/v1` EndpointSlices
//! and Multi-Cluster Services `multicluster.x-k8s.io/v1alpha1` ServiceExports,
//! watched through `kube-rs` (list, then watch from the list's
//! `resourceVersion`; a `410 Gone` relists).
//!
//! How a Service becomes a catalog entry:
//! - its TCP ports (UDP and SCTP are not carried) with their names; the
//!   protocol from `appProtocol` (`http`, `kubernetes.io/h2c`, `grpc`, ...)
//!   or else the port name's prefix, Istio style (`http`, `http2`, `grpc`,
//!   `grpc-web`, `http-admin`, ...); anything else is opaque `tcp`;
//! - headless when `clusterIP` is `None`; its ready endpoints with a
//!   `hostname` get their own DNS names (`HeadlessEndpoint`);
//! - endpoints: the addresses of the *ready* endpoints (a missing `ready`
//!   condition counts as ready, as the API documents) of the IPv4 and IPv6
//!   EndpointSlices labelled `kubernetes.io/service-name`, with the slice's
//!   port of the same name as each Service port;
//! - exported only while a ServiceExport of the same namespace and name
//!   exists (and is not being deleted); its `creationTimestamp` is the export
//!   time the MCS conflict rule uses (oldest export wins);
//! - `ExternalName` Services and Services without a TCP port are left out.
//!
//! Nothing is published until every watch has listed once, so a restart
//! never withdraws exports for the moment between listing Services and
//! listing their EndpointSlices. API errors (list or watch refused, `410
//! Gone`) keep the last view, are logged and counted, and the watch is
//! retried with kube-rs' default backoff (0.8 s doubling to 30 s, jittered).
//!
//! The tests run against recorded API responses replayed by an in-process
//! `tower` service (`testdata/kubernetes/`); no real API server runs in this
//! repository's tests.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tracing::{debug, error, info, warn};

use super::{Backoff, FailureKind, SourceHandle};
use crate::catalog::{Export, HeadlessEndpoint, LocalService, Protocol, ServiceKey, ServicePort};
use crate::{ClusterName, Hostname, Namespace, PortName};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// First retry when no client can be built.
const CLIENT_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between attempts to build a client.
const CLIENT_RETRY_MAX: Duration = Duration::from_secs(60);

/// Where the API server is and what to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// A kubeconfig file; `None`: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; `None`: its current context.
    pub context: Option<String>,
    /// Namespaces to watch; empty: all of them.
    pub namespaces: Vec<Namespace>,
    /// This gateway's cluster, for headless endpoints.
    pub cluster: ClusterName,
}

impl KubernetesSettings {
    /// The source's name: `kubernetes:<kubeconfig>` or `kubernetes:in-cluster`.
    pub fn source_name(&self) -> String {
        match &self.kubeconfig {
            Some(path) => format!("kubernetes:{}", path.display()),
            None => "kubernetes:in-cluster".to_owned(),
        }
    }
}

/// The MCS ServiceExport resource (a CRD, so no generated type).
pub fn service_export_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport"),
        "serviceexports",
    )
}

/// A client from `settings`: its kubeconfig, or the in-cluster service
/// account.
pub async fn client(settings: &KubernetesSettings) -> Result<Client, String> {
    let config = match &settings.kubeconfig {
        None => kube::Config::incluster().map_err(|e| format!("in-cluster configuration: {e}"))?,
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let options = kube::config::KubeConfigOptions {
                context: settings.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
    };
    Client::try_from(config).map_err(|e| format!("cannot build a client: {e}"))
}

/// Builds a client (retrying with backoff while that fails), then watches
/// until `stop` fires.
pub async fn run(
    settings: KubernetesSettings,
    mut handle: SourceHandle,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(CLIENT_RETRY_MIN, CLIENT_RETRY_MAX);
    let client = loop {
        match client(&settings).await {
            Ok(client) => break client,
            Err(e) => {
                let wait = backoff.next_delay();
                error!(source = handle.name(), retry_in = ?wait, "{}: {e}", handle.name());
                handle.failed(FailureKind::Client);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    watch_cluster(
        client,
        &settings.namespaces,
        &settings.cluster,
        &mut handle,
        stop,
    )
    .await;
}

/// Which of the three resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
    ServiceExports,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::ServiceExports => "serviceexports",
        })
    }
}

/// One item from one of the watches.
enum Update {
    Service(usize, Box<Event<Service>>),
    Slice(usize, Box<Event<EndpointSlice>>),
    Export(usize, Box<Event<DynamicObject>>),
    Failed(Kind, watcher::Error),
}

/// The objects one watch (one resource in one namespace, or in all) holds.
struct Stream<K> {
    objects: BTreeMap<(String, String), K>,
    /// A (re)list in progress.
    listing: Option<BTreeMap<(String, String), K>>,
    /// Listed at least once.
    synced: bool,
}

impl<K> Default for Stream<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }
}

fn key_of<K: Resource>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

impl<K: Resource> Stream<K> {
    /// Applies `event`; true if the objects changed.
    fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                self.listing.get_or_insert_default().insert(key_of(&o), o);
                false
            }
            Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Event::Apply(o) => {
                self.objects.insert(key_of(&o), o);
                true
            }
            Event::Delete(o) => {
                self.objects.remove(&key_of(&o));
                true
            }
        }
    }
}

/// Everything the watches hold.
#[derive(Default)]
struct State {
    services: Vec<Stream<Service>>,
    slices: Vec<Stream<EndpointSlice>>,
    exports: Vec<Stream<DynamicObject>>,
}

impl State {
    fn synced(&self) -> bool {
        self.services.iter().all(|s| s.synced)
            && self.slices.iter().all(|s| s.synced)
            && self.exports.iter().all(|s| s.synced)
    }

    /// Applies `update`; true if some objects changed.
    fn apply(&mut self, update: Update, handle: &SourceHandle) -> bool {
        match update {
            Update::Service(i, e) => self.services.get_mut(i).is_some_and(|s| s.apply(*e)),
            Update::Slice(i, e) => self.slices.get_mut(i).is_some_and(|s| s.apply(*e)),
            Update::Export(i, e) => self.exports.get_mut(i).is_some_and(|s| s.apply(*e)),
            Update::Failed(kind, e) => {
                let label = match &e {
                    watcher::Error::InitialListFailed(_) => FailureKind::List,
                    watcher::Error::WatchError(status) if status.code == 410 => FailureKind::Gone,
                    _ => FailureKind::Watch,
                };
                if label == FailureKind::Gone {
                    info!(
                        source = handle.name(),
                        resource = %kind,
                        "watch of {kind} expired (410 Gone); listing again"
                    );
                } else {
                    warn!(
                        source = handle.name(),
                        resource = %kind,
                        error = %e,
                        "{kind}: {e}; keeping the last known services and retrying"
                    );
                }
                handle.failed(label);
                false
            }
        }
    }

    fn build(&self, cluster: &ClusterName) -> Vec<LocalService> {
        build(
            self.services.iter().flat_map(|s| s.objects.values()),
            self.slices.iter().flat_map(|s| s.objects.values()),
            self.exports.iter().flat_map(|s| s.objects.values()),
            cluster,
        )
    }
}

/// Forwards one watch's events into `tx`, tagged by `wrap`.
fn forward<K>(
    tasks: &mut JoinSet<()>,
    api: Api<K>,
    kind: Kind,
    tx: mpsc::Sender<Update>,
    wrap: impl Fn(Event<K>) -> Update + Send + 'static,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
{
    tasks.spawn(async move {
        let events = watcher::watcher(api, watcher::Config::default()).default_backoff();
        let mut events = std::pin::pin!(events);
        while let Some(item) = events.next().await {
            let update = match item {
                Ok(event) => wrap(event),
                Err(e) => Update::Failed(kind, e),
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    });
}

/// Watches Services, EndpointSlices and ServiceExports in `namespaces` (all
/// when empty) through `client`, publishing through `handle` until `stop`
/// fires.
pub async fn watch_cluster(
    client: Client,
    namespaces: &[Namespace],
    cluster: &ClusterName,
    handle: &mut SourceHandle,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel(256);
    let mut tasks = JoinSet::new();
    let mut state = State::default();
    let exports = service_export_resource();
    let scopes: Vec<Option<&str>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().map(|n| Some(n.as_str())).collect()
    };
    for (i, ns) in scopes.iter().enumerate() {
        let (services, slices, exported) = match ns {
            None => (
                Api::<Service>::all(client.clone()),
                Api::<EndpointSlice>::all(client.clone()),
                Api::<DynamicObject>::all_with(client.clone(), &exports),
            ),
            Some(ns) => (
                Api::<Service>::namespaced(client.clone(), ns),
                Api::<EndpointSlice>::namespaced(client.clone(), ns),
                Api::<DynamicObject>::namespaced_with(client.clone(), ns, &exports),
            ),
        };
        state.services.push(Stream::default());
        state.slices.push(Stream::default());
        state.exports.push(Stream::default());
        forward(&mut tasks, services, Kind::Services, tx.clone(), move |e| {
            Update::Service(i, Box::new(e))
        });
        forward(
            &mut tasks,
            slices,
            Kind::EndpointSlices,
            tx.clone(),
            move |e| Update::Slice(i, Box::new(e)),
        );
        forward(
            &mut tasks,
            exported,
            Kind::ServiceExports,
            tx.clone(),
            move |e| Update::Export(i, Box::new(e)),
        );
    }
    drop(tx);
    let mut announced = false;
    loop {
        let first = tokio::select! {
            update = rx.recv() => match update {
                Some(u) => u,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let mut changed = state.apply(first, handle);
        // Take whatever else is already waiting: one publication per burst.
        while let Ok(update) = rx.try_recv() {
            changed |= state.apply(update, handle);
        }
        if !changed || !state.synced() {
            continue;
        }
        if !announced {
            info!(
                source = handle.name(),
                "listed services, endpoint slices and service exports"
            );
            announced = true;
        }
        handle.publish(state.build(cluster));
    }
}

/// Whether `o` is being deleted.
fn deleting<K: Resource>(o: &K) -> bool {
    o.meta().deletion_timestamp.is_some()
}

/// The protocol of a port, from its `appProtocol`, else its name.
pub fn port_protocol(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let by_app = app_protocol.and_then(|a| match a.to_ascii_lowercase().as_str() {
        "http" | "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http),
        "grpc" | "grpc-web" => Some(Protocol::Grpc),
        "tcp" | "tls" | "https" | "kubernetes.io/ws" | "kubernetes.io/wss" => Some(Protocol::Tcp),
        _ => None,
    });
    by_app.unwrap_or_else(|| {
        let prefix = name
            .unwrap_or_default()
            .split('-')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match prefix.as_str() {
            "http" | "http2" | "h2c" => Protocol::Http,
            "grpc" => Protocol::Grpc,
            _ => Protocol::Tcp,
        }
    })
}

/// `""` and absent names are the same (the unnamed port).
fn port_name(name: Option<&String>) -> Option<&str> {
    name.map(String::as_str).filter(|n| !n.is_empty())
}

fn is_tcp(protocol: Option<&String>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// The catalog entries for `services`, with endpoints from `slices` and the
/// export flag from `exports`; see the module docs for the rules.
pub fn build<'a>(
    services: impl Iterator<Item = &'a Service>,
    slices: impl Iterator<Item = &'a EndpointSlice>,
    exports: impl Iterator<Item = &'a DynamicObject>,
    cluster: &ClusterName,
) -> Vec<LocalService> {
    let mut slices_of: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if deleting(slice) {
            continue;
        }
        let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) else {
            continue;
        };
        slices_of
            .entry((slice.namespace().unwrap_or_default(), service.clone()))
            .or_default()
            .push(slice);
    }
    let exported: BTreeMap<(String, String), u64> = exports
        .filter(|e| !deleting(*e))
        .map(|e| {
            let created = e
                .meta()
                .creation_timestamp
                .as_ref()
                .and_then(|t| u64::try_from(t.0.as_millisecond()).ok())
                .unwrap_or(0);
            (key_of(e), created)
        })
        .collect();

    let mut out = Vec::new();
    for service in services {
        let (ns, name) = key_of(service);
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let (Ok(namespace), Ok(service_name)) = (ns.parse::<Namespace>(), name.parse()) else {
            debug!(namespace = %ns, name = %name, "service name is not a valid catalog name; skipped");
            continue;
        };
        // Service ports we carry, by the name EndpointSlices use for them.
        let mut ports: Vec<ServicePort> = Vec::new();
        let mut names: Vec<Option<&str>> = Vec::new();
        for p in spec.ports.iter().flatten() {
            let Ok(number) = u16::try_from(p.port) else {
                continue;
            };
            if !is_tcp(p.protocol.as_ref()) || number == 0 {
                continue;
            }
            let pname = port_name(p.name.as_ref());
            ports.push(ServicePort {
                port: number,
                protocol: port_protocol(p.app_protocol.as_deref(), pname),
                name: pname.and_then(|n| n.parse::<PortName>().ok()),
            });
            names.push(pname);
        }
        if ports.is_empty() {
            debug!(namespace = %ns, name = %name, "service has no TCP port; skipped");
            continue;
        }
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let mut endpoints: Vec<SocketAddr> = Vec::new();
        let mut headless_endpoints: Vec<HeadlessEndpoint> = Vec::new();
        for slice in slices_of
            .get(&(ns.clone(), name.clone()))
            .into_iter()
            .flatten()
        {
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                continue;
            }
            let targets: Vec<u16> = slice
                .ports
                .iter()
                .flatten()
                .filter(|p| is_tcp(p.protocol.as_ref()))
                .filter(|p| names.contains(&port_name(p.name.as_ref())))
                .filter_map(|p| p.port.and_then(|n| u16::try_from(n).ok()))
                .filter(|n| *n != 0)
                .collect();
            for endpoint in &slice.endpoints {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if !ready {
                    continue;
                }
                for address in &endpoint.addresses {
                    let Ok(ip) = address.parse::<IpAddr>() else {
                        continue;
                    };
                    endpoints.extend(targets.iter().map(|port| SocketAddr::new(ip, *port)));
                    if headless {
                        headless_endpoints.push(HeadlessEndpoint {
                            cluster: cluster.clone(),
                            hostname: endpoint
                                .hostname
                                .as_deref()
                                .and_then(|h| h.parse::<Hostname>().ok()),
                            address: ip,
                        });
                    }
                }
            }
        }
        let export_time = exported.get(&(ns.clone(), name.clone())).copied();
        out.push(LocalService {
            export: Export {
                key: ServiceKey {
                    namespace,
                    name: service_name,
                },
                ports,
                export_time_millis: export_time.unwrap_or(0),
                headless,
                endpoints: headless_endpoints,
                subsets: Vec::new(),
            },
            endpoints,
            endpoint_info: Default::default(),
            subsets: Vec::new(),
            exported: export_time.is_some(),
            allowed_callers: None,
            passthrough: false,
        });
    }
    out
}

#[cfg(test)]
mod tests;
