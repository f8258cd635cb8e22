//! DNS in the gateway process: the `clusterset.local` zone follows the
//! catalog, the DNS server answers on `dns.listen` (UDP and TCP), and the
//! clusterset listeners accept traffic at each service's clusterset IP.
//!
//! Clusterset listeners bind `<clusterset IP>:<service port>` for every
//! port of every service with a clusterset IP, and hand each connection to
//! the same proxy logic as the outbound listener: HTTP and gRPC ports to the
//! HTTP proxy (which routes by the connection's address when the Host names
//! no service), TCP ports to the L4 proxy. They are bound with IP_FREEBIND,
//! so a range outside loopback works once the operator routes it to the host
//! (`ip route add local 10.96.240.0/20 dev lo`); 127.240.0.0/16, the default,
//! needs nothing.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use isthmus_federation::catalog::Protocol;
use isthmus_federation::dns::server::{serve_tcp, serve_udp};
use isthmus_federation::dns::{Allocations, Allocator, ClusterSet, DnsMetrics, DnsServer};
use isthmus_federation::peering::Hub;
use isthmus_federation::{Catalog, ClusterName, ServiceKey};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::GetSocketDigest;
use pingora_core::protocols::SocketDigest;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::services::listening::Service;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use socket2::{Domain, Socket, Type};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::dns::DnsConfig;
use crate::health::Readiness;
use crate::upstream::Upstreams;

/// The DNS server's sockets, bound before start-up so that a taken port is
/// an error at once, not a silent gap.
pub struct DnsSockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

/// Binds UDP and TCP on `addr`, with SO_REUSEPORT so that an upgraded
/// process can bind them while the old one drains.
pub fn bind(addr: SocketAddr) -> io::Result<DnsSockets> {
    let domain = Domain::for_address(addr);
    let udp = Socket::new(domain, Type::DGRAM, None)?;
    udp.set_reuse_port(true)?;
    udp.set_nonblocking(true)?;
    udp.bind(&addr.into())?;
    Ok(DnsSockets {
        udp: udp.into(),
        tcp: crate::net::upgradable_tcp_listener(addr, false)?,
    })
}

/// The DNS server's parts, built before start-up.
pub struct DnsParts {
    /// The clusterset IPs and zone.
    pub cluster_set: Arc<ClusterSet>,
    /// The server.
    pub server: Arc<DnsServer>,
    /// Its sockets.
    pub sockets: DnsSockets,
}

impl DnsParts {
    /// The parts for `config` when `dns.listen` is set: the sockets are bound
    /// now (so a taken port fails start-up, naming `dns.listen`) and the saved
    /// allocations are read. Headless services publish only the endpoints of
    /// `cluster` (this one) that `upstreams` holds up.
    pub fn new(
        config: &DnsConfig,
        cluster: &ClusterName,
        upstreams: Arc<Upstreams>,
        registry: &Registry,
    ) -> Result<Option<Self>, String> {
        let Some(addr) = config.listen else {
            return Ok(None);
        };
        let sockets = bind(addr).map_err(|e| format!("dns.listen: cannot bind {addr}: {e}"))?;
        let metrics = DnsMetrics::new(registry).map_err(|e| format!("DNS metrics: {e}"))?;
        let allocator = Allocator::open(
            config.clusterset_ipv4_range,
            config.clusterset_ipv6_range,
            config.state_file.clone(),
        )
        .map_err(|e| format!("dns.state_file: {e}"))?;
        let cluster_set = Arc::new(
            ClusterSet::new(allocator, config.ranges(), config.ttl, metrics)
                .with_endpoint_health(cluster.clone(), upstreams),
        );
        let server = DnsServer::new(
            cluster_set.zone().clone(),
            config.forward().as_ref(),
            config.policy(),
            cluster_set.metrics().clone(),
        )?;
        Ok(Some(Self {
            cluster_set,
            server: Arc::new(server),
            sockets,
        }))
    }
}

/// The DNS background service: the zone publisher, the UDP and TCP servers
/// and the clusterset listeners.
pub struct DnsService {
    /// The zone and allocations.
    pub cluster_set: Arc<ClusterSet>,
    /// Where the catalog comes from.
    pub hub: Arc<Hub>,
    /// The server (forwarding settings included).
    pub server: Arc<DnsServer>,
    /// Taken at start.
    pub sockets: Mutex<Option<DnsSockets>>,
    /// Accept traffic at clusterset IPs, when enabled.
    pub listeners: Option<ClusterSetListeners>,
    /// Reports "dns" readiness.
    pub readiness: Arc<Readiness>,
}

#[async_trait]
impl BackgroundService for DnsService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (stop_tx, stop) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.cluster_set.clone().run(
            self.hub.catalog().clone(),
            self.hub.catalog_changes(),
            stop.clone(),
        ));
        let sockets = self.sockets.lock().take();
        if let Some(sockets) = sockets {
            match (
                tokio::net::UdpSocket::from_std(sockets.udp),
                tokio::net::TcpListener::from_std(sockets.tcp),
            ) {
                (Ok(udp), Ok(tcp)) => {
                    let addr = udp.local_addr().ok();
                    tasks.spawn(serve_udp(self.server.clone(), udp, stop.clone()));
                    tasks.spawn(serve_tcp(self.server.clone(), tcp, stop.clone()));
                    let policy = self.server.policy();
                    let allow: Vec<String> = policy
                        .allow_sources
                        .networks()
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    info!(
                        addr = ?addr,
                        allow_sources = %allow.join(","),
                        rate_limit = policy.rate_limit.per_second,
                        tcp_max_connections = policy.tcp.total,
                        tcp_max_connections_per_source = policy.tcp.per_source,
                        "DNS listening (UDP and TCP)"
                    );
                    self.readiness.set("dns", true, "listening");
                }
                (Err(e), _) | (_, Err(e)) => {
                    error!(error = %e, "dns.listen: cannot serve DNS");
                    self.readiness
                        .set("dns", false, format!("cannot serve: {e}"));
                }
            }
        }
        if let Some(listeners) = &self.listeners {
            tasks.spawn(listeners.clone().run(
                self.cluster_set.allocations(),
                self.hub.catalog().clone(),
                self.hub.catalog_changes(),
                shutdown.clone(),
            ));
        }
        let _ = shutdown.changed().await;
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
    }
}

/// How often an address that could not be bound is tried again.
const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Builds the L4 app for a TCP service port.
pub type TcpAppFactory = Arc<dyn Fn(&ServiceKey, u16) -> Arc<dyn DynApp> + Send + Sync>;

/// A pingora app behind a trait object.
#[async_trait]
pub trait DynApp: Send + Sync + 'static {
    /// Serves one downstream connection, and its reuses.
    async fn serve(self: Arc<Self>, stream: L4Stream, shutdown: ShutdownWatch);
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> DynApp for A {
    async fn serve(self: Arc<Self>, stream: L4Stream, shutdown: ShutdownWatch) {
        Service::<A>::handle_event(Box::new(stream), self, shutdown).await;
    }
}

/// Listeners at clusterset IPs; see the module docs.
#[derive(Clone)]
pub struct ClusterSetListeners {
    http: Arc<dyn DynApp>,
    tcp: TcpAppFactory,
    /// At most this many listeners are open: each is a file descriptor, and
    /// the ports come from peers' exports, so they must not be able to use
    /// up the descriptors the data plane needs.
    max_listeners: usize,
    metrics: ListenerMetrics,
}

isthmus_federation::label_enum! {
    /// Why a clusterset listener could not be opened: the `reason` label of
    /// `isthmus_clusterset_listener_errors_total`.
    pub enum BindError {
        /// Something else listens there already.
        AddressInUse => "address_in_use",
        /// The process may not bind that address or port.
        PermissionDenied => "permission_denied",
        /// The clusterset IP is not assigned to an interface here.
        AddressNotAvailable => "address_not_available",
        /// Any other error.
        Other => "other",
    }
}

impl BindError {
    /// The reason for a failed bind.
    fn of(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::AddrInUse => Self::AddressInUse,
            io::ErrorKind::PermissionDenied => Self::PermissionDenied,
            io::ErrorKind::AddrNotAvailable => Self::AddressNotAvailable,
            _ => Self::Other,
        }
    }
}

#[derive(Clone)]
struct ListenerMetrics {
    listeners: IntGauge,
    over_cap: IntGauge,
    bind_errors: IntCounterVec,
}

/// The share of the open-file limit clusterset listeners may take: the rest
/// is for connections, upstreams, files and the other listeners.
const LISTENER_SHARE_OF_NOFILE: u64 = 4;
/// The fewest listeners allowed whatever the limit.
const MIN_LISTENERS: usize = 64;

/// How many clusterset listeners this process may open: a quarter of its
/// soft open-file limit (`LimitNOFILE=65536` in the unit: 16,384).
pub fn max_clusterset_listeners() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    usize::try_from(soft / LISTENER_SHARE_OF_NOFILE)
        .unwrap_or(usize::MAX)
        .max(MIN_LISTENERS)
}

/// At most `max` of `wanted`: those already `open` first, so a new service
/// never takes a working one's listener, then the rest by address. Returns
/// what was left out.
fn within_cap(
    wanted: &mut HashMap<SocketAddr, Serves>,
    open: &HashMap<SocketAddr, (Serves, JoinHandle<()>)>,
    max: usize,
) -> usize {
    if wanted.len() <= max {
        return 0;
    }
    let mut order: Vec<(bool, SocketAddr)> = wanted
        .iter()
        .map(|(addr, serves)| {
            let is_open = open.get(addr).is_some_and(|(s, _)| s == serves);
            (!is_open, *addr)
        })
        .collect();
    order.sort_unstable();
    let left_out = order.len() - max;
    for (_, addr) in order.into_iter().skip(max) {
        wanted.remove(&addr);
    }
    left_out
}

/// What one listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Serves {
    Http,
    Tcp(ServiceKey, u16),
}

impl ClusterSetListeners {
    /// Listeners handing HTTP connections to `http` and TCP ones to the app
    /// `tcp` builds for the service port.
    pub fn new(
        http: Arc<dyn DynApp>,
        tcp: TcpAppFactory,
        max_listeners: usize,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let listeners = IntGauge::with_opts(Opts::new(
            "isthmus_clusterset_listeners",
            "Listeners open at clusterset IPs (one per service port).",
        ))?;
        registry.register(Box::new(listeners.clone()))?;
        let bind_errors = IntCounterVec::new(
            Opts::new(
                "isthmus_clusterset_listener_errors_total",
                "Clusterset listeners that could not be opened, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(bind_errors.clone()))?;
        let over_cap = IntGauge::with_opts(Opts::new(
            "isthmus_clusterset_listeners_over_cap",
            "Clusterset listeners wanted but not opened because of the cap (a quarter of the open-file limit).",
        ))?;
        registry.register(Box::new(over_cap.clone()))?;
        Ok(Self {
            http,
            tcp,
            max_listeners,
            metrics: ListenerMetrics {
                listeners,
                over_cap,
                bind_errors,
            },
        })
    }

    /// What should be listening, for these allocations and this catalog.
    fn wanted(allocations: &Allocations, catalog: &Catalog) -> HashMap<SocketAddr, Serves> {
        let mut out = HashMap::new();
        for (key, ip) in allocations.iter() {
            let Some(entry) = catalog.get(key) else {
                continue;
            };
            for address in [
                ip.ipv4.map(std::net::IpAddr::V4),
                ip.ipv6.map(std::net::IpAddr::V6),
            ]
            .into_iter()
            .flatten()
            {
                for port in &entry.ports {
                    let serves = match port.protocol {
                        Protocol::Http | Protocol::Grpc => Serves::Http,
                        Protocol::Tcp => Serves::Tcp(key.clone(), port.port),
                    };
                    out.insert(SocketAddr::new(address, port.port), serves);
                }
            }
        }
        out
    }

    /// Keeps the listeners in step with the allocations and the catalog until
    /// `shutdown`. A removed listener stops accepting; its connections go on.
    pub async fn run(
        self,
        mut allocations: watch::Receiver<Arc<Allocations>>,
        catalog: Arc<ArcSwap<Catalog>>,
        mut changes: watch::Receiver<u64>,
        mut shutdown: ShutdownWatch,
    ) {
        let mut open: HashMap<SocketAddr, (Serves, JoinHandle<()>)> = HashMap::new();
        // Addresses that failed to bind: retried every BIND_RETRY, logged
        // at the first failure only.
        let mut failed: HashMap<SocketAddr, Serves> = HashMap::new();
        let mut retry_failed = false;
        let mut was_over = 0;
        loop {
            let mut wanted = Self::wanted(&allocations.borrow_and_update(), &catalog.load());
            let over = within_cap(&mut wanted, &open, self.max_listeners);
            if over > 0 && was_over == 0 {
                warn!(
                    max = self.max_listeners,
                    left_out = over,
                    "more clusterset listeners wanted than the cap allows; the newest are not opened"
                );
            }
            was_over = over;
            self.metrics
                .over_cap
                .set(i64::try_from(over).unwrap_or(i64::MAX));
            open.retain(|addr, (serves, task)| {
                let keep = wanted.get(addr) == Some(serves);
                if !keep {
                    task.abort();
                }
                keep
            });
            failed.retain(|addr, serves| wanted.get(addr) == Some(serves));
            for (addr, serves) in wanted {
                let failed_before = failed.contains_key(&addr);
                if open.contains_key(&addr) || (failed_before && !retry_failed) {
                    continue;
                }
                match listen(addr) {
                    Ok(listener) => {
                        let app = match &serves {
                            Serves::Http => self.http.clone(),
                            Serves::Tcp(key, port) => (self.tcp)(key, *port),
                        };
                        let task = tokio::spawn(accept(listener, app, shutdown.clone()));
                        if failed.remove(&addr).is_some() {
                            info!(%addr, "clusterset listener opened after a failure");
                        }
                        open.insert(addr, (serves, task));
                    }
                    Err(e) => {
                        self.metrics
                            .bind_errors
                            .with_label_values(&[BindError::of(&e).label()])
                            .inc();
                        if !failed_before {
                            warn!(%addr, error = %e, "cannot open a clusterset listener; retrying every 30s");
                        }
                        failed.insert(addr, serves);
                    }
                }
            }
            self.metrics
                .listeners
                .set(i64::try_from(open.len()).unwrap_or(i64::MAX));
            retry_failed = false;
            tokio::select! {
                changed = allocations.changed() => if changed.is_err() { break },
                changed = changes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(BIND_RETRY), if !failed.is_empty() => retry_failed = true,
                _ = shutdown.changed() => break,
            }
        }
        for (_, (_, task)) in open {
            task.abort();
        }
    }
}

fn listen(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    // Addresses outside loopback may be routed to this host without being
    // configured on an interface: freebind.
    tokio::net::TcpListener::from_std(crate::net::upgradable_tcp_listener(addr, true)?)
}

async fn accept(listener: tokio::net::TcpListener, app: Arc<dyn DynApp>, shutdown: ShutdownWatch) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "clusterset listener accept error");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let fd = tcp.as_raw_fd();
        let mut stream = L4Stream::from(tcp);
        // The proxy reads the connection's own address from here.
        stream.set_socket_digest(SocketDigest::from_raw_fd(fd));
        tokio::spawn(app.clone().serve(stream, shutdown.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_cap_keeps_open_listeners_first_then_by_address() {
        let addr = |i: u16| SocketAddr::from(([127, 240, 0, 1], i));
        let mut wanted: HashMap<SocketAddr, Serves> =
            (1..=5).map(|i| (addr(i), Serves::Http)).collect();
        let open: HashMap<SocketAddr, (Serves, JoinHandle<()>)> = HashMap::new();
        assert_eq!(within_cap(&mut wanted, &open, 10), 0);
        assert_eq!(wanted.len(), 5);
        assert_eq!(within_cap(&mut wanted, &open, 3), 2);
        let mut kept: Vec<SocketAddr> = wanted.keys().copied().collect();
        kept.sort();
        assert_eq!(kept, [addr(1), addr(2), addr(3)]);
    }

    #[tokio::test]
    async fn an_open_listener_is_not_displaced_by_a_new_one() {
        let addr = |i: u16| SocketAddr::from(([127, 240, 0, 1], i));
        let open: HashMap<SocketAddr, (Serves, JoinHandle<()>)> =
            [(addr(9), (Serves::Http, tokio::spawn(async {})))].into();
        let mut wanted: HashMap<SocketAddr, Serves> =
            (1..=9).map(|i| (addr(i), Serves::Http)).collect();
        assert_eq!(within_cap(&mut wanted, &open, 2), 7);
        assert!(wanted.contains_key(&addr(9)) && wanted.contains_key(&addr(1)));
    }
}
