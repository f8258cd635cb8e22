//! Against recorded API responses: `testdata/kubernetes/` holds list
//! responses and watch event streams shaped exactly as a Kubernetes API
//! server sends them (list `resourceVersion`s, `ADDED`/`MODIFIED`/`DELETED`/
//! `BOOKMARK` lines, a `410 Expired` error event). An in-process `tower`
//! service replays them to a real `kube::Client`. No real API server runs
//! here.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;
use crate::discovery::testing::{Published, sink};
use crate::discovery::{DiscoveryMetrics, SourceHandle};

const SERVICES_LIST: &str = include_str!("../testdata/kubernetes/services-list.json");
const SLICES_LIST: &str = include_str!("../testdata/kubernetes/endpointslices-list.json");
const SLICES_RELIST: &str = include_str!("../testdata/kubernetes/endpointslices-relist.json");
const SLICES_WATCH: &str = include_str!("../testdata/kubernetes/endpointslices-watch.jsonl");
const EXPORTS_LIST: &str = include_str!("../testdata/kubernetes/serviceexports-list.json");
const EXPORTS_WATCH: &str = include_str!("../testdata/kubernetes/serviceexports-watch.jsonl");

type Body = BoxBody<Bytes, Infallible>;

/// Replays recorded responses: per resource, list bodies in order (the last
/// one repeats) and watch streams in order (then watches that stay open and
/// quiet, as a real one does between events).
#[derive(Default)]
struct Replay {
    lists: Mutex<HashMap<&'static str, VecDeque<&'static str>>>,
    watches: Mutex<HashMap<&'static str, VecDeque<UnboundedReceiverStream<Bytes>>>>,
    idle: Mutex<Vec<UnboundedSender<Bytes>>>,
    requests: Mutex<Vec<String>>,
}

fn resource_of(path: &str) -> Option<&'static str> {
    ["services", "endpointslices", "serviceexports"]
        .into_iter()
        .find(|r| path.ends_with(&format!("/{r}")))
}

/// Keeps only a list's items in `namespace`, as the API server would for a
/// namespaced list.
fn in_namespace(list: &str, namespace: Option<&str>) -> String {
    let Some(ns) = namespace else {
        return list.to_owned();
    };
    let mut v: serde_json::Value = serde_json::from_str(list).unwrap();
    if let Some(items) = v["items"].as_array_mut() {
        items.retain(|i| i["metadata"]["namespace"] == ns);
    }
    v.to_string()
}

impl Replay {
    fn list(&self, resource: &'static str, bodies: &[&'static str]) {
        self.lists
            .lock()
            .insert(resource, bodies.iter().copied().collect());
    }

    /// A scripted watch of `resource`: the test sends its lines.
    fn watch(&self, resource: &'static str) -> UnboundedSender<Bytes> {
        let (tx, rx) = unbounded_channel();
        self.watches
            .lock()
            .entry(resource)
            .or_default()
            .push_back(UnboundedReceiverStream::new(rx));
        tx
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().clone()
    }

    fn respond(&self, req: &http::Request<kube::client::Body>) -> http::Response<Body> {
        let uri = req.uri().clone();
        self.requests.lock().push(uri.to_string());
        let path = uri.path();
        let namespace = path
            .split("/namespaces/")
            .nth(1)
            .and_then(|rest| rest.split('/').next());
        let Some(resource) = resource_of(path) else {
            return json(404, r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"NotFound","code":404}"#.to_owned());
        };
        let watching = uri.query().unwrap_or_default().contains("watch=true");
        if !watching {
            let mut lists = self.lists.lock();
            let queue = lists.entry(resource).or_default();
            let body = if queue.len() > 1 {
                queue.pop_front()
            } else {
                queue.front().copied()
            };
            return json(200, in_namespace(body.unwrap_or("{}"), namespace));
        }
        let scripted = self
            .watches
            .lock()
            .get_mut(resource)
            .and_then(VecDeque::pop_front);
        let stream = scripted.unwrap_or_else(|| {
            let (tx, rx) = unbounded_channel();
            self.idle.lock().push(tx);
            UnboundedReceiverStream::new(rx)
        });
        let body = StreamBody::new(stream.map(|b| Ok::<_, Infallible>(Frame::data(b))));
        http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .unwrap()
    }
}

fn json(status: u16, body: String) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(body))))
        .unwrap()
}

fn client(replay: &Arc<Replay>) -> Client {
    let replay = replay.clone();
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let response = replay.respond(&req);
        async move { Ok::<_, Infallible>(response) }
    });
    Client::new(service, "default")
}

fn line(jsonl: &str, n: usize) -> Bytes {
    Bytes::from(format!("{}\n", jsonl.lines().nth(n).unwrap()))
}

fn find<'a>(services: &'a [LocalService], key: &str) -> &'a LocalService {
    services
        .iter()
        .find(|s| s.export.key.to_string() == key)
        .unwrap_or_else(|| panic!("{key} not published"))
}

fn endpoints(s: &LocalService) -> Vec<String> {
    s.endpoints.iter().map(ToString::to_string).collect()
}

fn start(
    replay: &Arc<Replay>,
    namespaces: Vec<Namespace>,
) -> (Published, DiscoveryMetrics, watch::Sender<bool>) {
    let (sink, published) = sink();
    let metrics = DiscoveryMetrics::new(&prometheus::Registry::new()).unwrap();
    let mut handle = SourceHandle::new("kubernetes:test", sink, metrics.clone());
    let (stop_tx, stop) = watch::channel(false);
    let client = client(replay);
    tokio::spawn(async move {
        watch_cluster(
            client,
            &namespaces,
            &"east".parse().unwrap(),
            &mut handle,
            stop,
        )
        .await;
    });
    (published, metrics, stop_tx)
}

#[tokio::test]
async fn services_endpoints_and_exports_follow_the_watches() {
    let replay = Arc::new(Replay::default());
    replay.list("services", &[SERVICES_LIST]);
    replay.list("endpointslices", &[SLICES_LIST, SLICES_RELIST]);
    replay.list("serviceexports", &[EXPORTS_LIST]);
    let slices = replay.watch("endpointslices");
    let exports = replay.watch("serviceexports");
    let (mut published, metrics, _stop) = start(&replay, Vec::new());

    // Listed: three services; UDP ports are not carried.
    let (source, view) = published.next().await;
    assert_eq!(source, "kubernetes:test");
    assert_eq!(view.len(), 3);
    let dns = find(&view, "kube-system/kube-dns");
    assert_eq!(dns.export.ports.len(), 1);
    assert_eq!(dns.export.ports[0].port, 53);
    assert_eq!(dns.export.ports[0].protocol, Protocol::Tcp);
    assert!(dns.endpoints.is_empty() && !dns.exported);
    let ledger = find(&view, "payments/ledger");
    assert_eq!(ledger.export.ports[0].port, 80);
    assert_eq!(ledger.export.ports[0].protocol, Protocol::Http);
    assert_eq!(
        ledger.export.ports[0].name.as_ref().unwrap().as_str(),
        "http"
    );
    // The not-ready endpoint is left out; the target port is the slice's.
    assert_eq!(endpoints(ledger), ["10.244.1.5:8080", "10.244.2.7:8080"]);
    assert!(!ledger.exported, "no ServiceExport yet");
    let db = find(&view, "payments/ledger-db");
    assert!(db.export.headless && db.exported);
    assert_eq!(db.export.export_time_millis, 1_730_795_400_000);
    let named: Vec<String> = db
        .export
        .endpoints
        .iter()
        .map(|e| format!("{}@{}", e.hostname.as_ref().unwrap(), e.address))
        .collect();
    assert_eq!(
        named,
        ["ledger-db-0@10.244.1.20", "ledger-db-1@10.244.2.21"]
    );

    // A ServiceExport appears: ledger is exported as of its creation.
    exports.send(line(EXPORTS_WATCH, 0)).unwrap();
    let (_, view) = published.next().await;
    let ledger = find(&view, "payments/ledger");
    assert!(ledger.exported);
    assert_eq!(ledger.export.export_time_millis, 1_740_823_200_000);

    // Its endpoints change: one pod terminating, another became ready.
    slices.send(line(SLICES_WATCH, 0)).unwrap();
    let (_, view) = published.next().await;
    assert_eq!(
        endpoints(find(&view, "payments/ledger")),
        ["10.244.1.5:8080", "10.244.3.9:8080"]
    );

    // A bookmark changes nothing; then the watch expires (410): relisted.
    slices.send(line(SLICES_WATCH, 1)).unwrap();
    slices.send(line(SLICES_WATCH, 2)).unwrap();
    let (_, view) = published.next().await;
    assert_eq!(
        endpoints(find(&view, "payments/ledger")),
        ["10.244.3.9:8080", "10.244.4.11:8080"]
    );
    assert_eq!(
        metrics
            .errors
            .with_label_values(&["kubernetes:test", "gone"])
            .get(),
        1
    );
    let requests = replay.requests();
    let slice_lists = requests
        .iter()
        .filter(|r| {
            r.starts_with("/apis/discovery.k8s.io/v1/endpointslices?") && !r.contains("watch=true")
        })
        .count();
    assert_eq!(slice_lists, 2, "{requests:#?}");
    assert!(
        requests.iter().any(
            |r| r.starts_with("/apis/discovery.k8s.io/v1/endpointslices?")
                && r.contains("watch=true")
                && r.contains("resourceVersion=1001")
        ),
        "{requests:#?}"
    );

    // The export is deleted: still a local service, no longer exported.
    exports.send(line(EXPORTS_WATCH, 1)).unwrap();
    let (_, view) = published.next().await;
    let ledger = find(&view, "payments/ledger");
    assert!(!ledger.exported);
    assert_eq!(endpoints(ledger), ["10.244.3.9:8080", "10.244.4.11:8080"]);

    // The watch after the relist resumed from the relist's version.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !replay.requests().iter().any(|r| {
        r.starts_with("/apis/discovery.k8s.io/v1/endpointslices?")
            && r.contains("watch=true")
            && r.contains("resourceVersion=1040")
    }) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:#?}",
            replay.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn namespaces_are_watched_one_by_one_and_errors_keep_the_view() {
    let replay = Arc::new(Replay::default());
    replay.list("services", &[SERVICES_LIST]);
    replay.list("endpointslices", &[SLICES_LIST]);
    replay.list("serviceexports", &[EXPORTS_LIST]);
    let slices = replay.watch("endpointslices");
    let (mut published, metrics, stop) = start(&replay, vec!["payments".parse().unwrap()]);
    let (_, view) = published.next().await;
    let keys: Vec<String> = view.iter().map(|s| s.export.key.to_string()).collect();
    assert_eq!(keys, ["payments/ledger", "payments/ledger-db"]);
    let requests = replay.requests();
    for path in [
        "/api/v1/namespaces/payments/services?",
        "/apis/discovery.k8s.io/v1/namespaces/payments/endpointslices?",
        "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/payments/serviceexports?",
    ] {
        assert!(
            requests.iter().any(|r| r.starts_with(path)),
            "{path} in {requests:#?}"
        );
    }
    // A malformed event (a name that is a number): counted, the view stays.
    slices
        .send(Bytes::from_static(
            b"{\"type\":\"MODIFIED\",\"object\":{\"kind\":\"EndpointSlice\",\"metadata\":{\"name\":7}}}\n",
        ))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics
        .errors
        .with_label_values(&["kubernetes:test", "watch"])
        .get()
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad line was never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    published.assert_quiet(Duration::from_millis(300)).await;
    stop.send_replace(true);
}

fn service(json: serde_json::Value) -> Service {
    serde_json::from_value(json).unwrap()
}

fn slice(json: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json).unwrap()
}

#[test]
fn building_follows_the_api_rules() {
    let services = [
        service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.0.0.1", "ports": [
                {"name": "grpc-api", "port": 9090},
                {"name": "admin", "port": 8081, "appProtocol": "kubernetes.io/h2c"},
                {"name": "metrics", "port": 9100, "protocol": "UDP"}
            ]}
        })),
        service(serde_json::json!({
            "metadata": {"name": "external", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]}
        })),
        service(serde_json::json!({
            "metadata": {"name": "udp-only", "namespace": "shop"},
            "spec": {"clusterIP": "10.0.0.2", "ports": [{"port": 53, "protocol": "UDP"}]}
        })),
    ];
    let slices = [
        slice(serde_json::json!({
            "metadata": {"name": "web-v6", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv6",
            // No conditions at all: ready, as the API documents.
            "endpoints": [{"addresses": ["fd00::5"]}],
            "ports": [{"name": "grpc-api", "port": 19090}, {"name": "other", "port": 1}]
        })),
        slice(serde_json::json!({
            "metadata": {"name": "web-fqdn", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["web.example.com"]}],
            "ports": [{"name": "grpc-api", "port": 9090}]
        })),
        slice(serde_json::json!({
            "metadata": {"name": "web-other-ns", "namespace": "other", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.9.9.9"]}],
            "ports": [{"name": "grpc-api", "port": 9090}]
        })),
    ];
    let export: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": {"name": "web", "namespace": "shop", "deletionTimestamp": "2025-01-01T00:00:00Z"}
    }))
    .unwrap();
    let built = build(
        services.iter(),
        slices.iter(),
        std::iter::once(&export),
        &"east".parse().unwrap(),
    );
    assert_eq!(
        built.len(),
        1,
        "ExternalName and UDP-only services are left out"
    );
    let web = &built[0];
    let ports: Vec<(u16, Protocol)> = web
        .export
        .ports
        .iter()
        .map(|p| (p.port, p.protocol))
        .collect();
    assert_eq!(ports, [(9090, Protocol::Grpc), (8081, Protocol::Http)]);
    assert_eq!(endpoints(web), ["[fd00::5]:19090"]);
    assert!(!web.exported, "an export being deleted does not export");
    assert!(!web.export.headless);

    assert_eq!(port_protocol(None, Some("http2-web")), Protocol::Http);
    assert_eq!(port_protocol(None, Some("tcp-db")), Protocol::Tcp);
    assert_eq!(port_protocol(Some("grpc"), Some("http")), Protocol::Grpc);
    assert_eq!(port_protocol(Some("unknown"), Some("grpc")), Protocol::Grpc);
    assert_eq!(port_protocol(None, None), Protocol::Tcp);
    assert_eq!(
        KubernetesSettings {
            kubeconfig: None,
            context: None,
            namespaces: Vec::new(),
            cluster: "east".parse().unwrap(),
        }
        .source_name(),
        "kubernetes:in-cluster"
    );
}
