//! Federation in the gateway process: the hub that builds the catalog from the
//! configuration, the discovery sources ([`crate::discovery`]) and the peers,
//! the peering listener, and one dialler per configured peer.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use isthmus_federation::peering::{
    Hub, PeerHello, PeerTarget, PeeringMetrics, dial, incarnation, serve,
};
use isthmus_federation::trust::tls::mtls_server_config;
use isthmus_federation::trust::{SpiffeAcceptor, SpiffeConnector};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::config::Config;
use crate::health::Readiness;
use crate::trust::Trust;

/// How long a peer has to complete the federation handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often readiness is brought up to date with the peers' syncs.
const READINESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Builds the hub for `config` and feeds it the configured services and peers.
pub fn hub(
    config: &Config,
    trust: Option<&Trust>,
    registry: &prometheus::Registry,
) -> Result<Arc<Hub>, prometheus::Error> {
    let me = PeerHello {
        spiffe_id: config.spiffe_id(),
        cluster: config.gateway.cluster.clone(),
        locality: config.gateway.locality.clone(),
        east_west: config.federation.advertise,
        incarnation: incarnation(),
        lease: config.federation.lease,
        labels: config.gateway.labels.clone(),
        weight: config.federation.weight,
    };
    let hub = Hub::new(
        me,
        config.federation.grace,
        Arc::default(),
        trust.map(|t| t.material().clone()),
        config.federation.limits,
        config.federation.state_file.clone(),
        PeeringMetrics::new(registry)?,
    );
    apply(config, &hub);
    Ok(hub)
}

/// Applies what can change on reload: services, static peers, who may peer
/// and assert what (grants, export patterns, bundle pushes; which peers
/// readiness waits for).
pub fn apply(config: &Config, hub: &Hub) {
    hub.set_authority(config.federation.authority(&config.trust));
    hub.set_static_peers(config.static_peers());
    hub.set_source("config", config.local_services());
}

/// What a reload changes in the federation.
pub struct Reconfigure {
    /// Gets the services, static peers and filters.
    pub hub: Arc<Hub>,
    /// Tells the diallers which peers to dial.
    pub targets: watch::Sender<Vec<PeerTarget>>,
    /// Starts, stops and restarts the discovery sources.
    pub discovery: crate::discovery::DiscoveryHandle,
}

impl Reconfigure {
    /// Applies `config`'s services, peers and filters.
    pub fn apply(&self, config: &Config) {
        apply(config, &self.hub);
        self.targets.send_replace(targets(config));
        self.discovery.apply(config);
    }
}

/// The peers to dial, from `config`.
pub fn targets(config: &Config) -> Vec<PeerTarget> {
    config
        .federation
        .peers
        .iter()
        .map(|p| PeerTarget {
            address: p.address,
            spiffe_id: p.spiffe_id.clone(),
        })
        .collect()
}

/// The federation background service: the hub's loop, the peering listener
/// and the diallers (reconciled when a reload changes `targets`).
pub struct FederationService {
    /// The hub.
    pub hub: Arc<Hub>,
    /// Identity and trust, when configured.
    pub trust: Option<Arc<Trust>>,
    /// Where to accept peers.
    pub listen: Option<std::net::SocketAddr>,
    /// The peers to dial; replaced on reload.
    pub targets: watch::Receiver<Vec<PeerTarget>>,
    /// Connect timeout for diallers.
    pub connect_timeout: std::time::Duration,
    /// Reports the first syncs.
    pub readiness: Arc<Readiness>,
    /// Whether readiness waits on federation at all.
    pub enabled: bool,
    /// The discovery sources of `[discovery]`.
    pub discovery: crate::discovery::DiscoveryRunner,
}

#[async_trait]
impl BackgroundService for FederationService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (stop_tx, stop) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.hub.clone().run(stop.clone()));
        let discovery = self.discovery.clone();
        let discovery_stop = stop.clone();
        tasks.spawn(async move { discovery.run(discovery_stop).await });
        if let Some(trust) = &self.trust {
            if let Some(addr) = self.listen {
                match self.listener(trust, addr).await {
                    Ok((listener, acceptor)) => {
                        info!(%addr, "federation listening");
                        tasks.spawn(serve(self.hub.clone(), listener, acceptor, stop.clone()));
                    }
                    Err(e) => {
                        error!(%addr, error = %e, "federation.listen: cannot listen on {addr}: {e}")
                    }
                }
            }
            let connector = SpiffeConnector::new(
                trust.material().clone(),
                trust.handshake_metrics.clone(),
                HANDSHAKE_TIMEOUT,
                vec![b"h2".to_vec()],
            );
            tasks.spawn(reconcile_diallers(
                self.hub.clone(),
                self.targets.clone(),
                connector,
                self.connect_timeout,
                stop.clone(),
            ));
        }
        if self.enabled {
            tasks.spawn(track_readiness(
                self.hub.clone(),
                self.readiness.clone(),
                stop.clone(),
            ));
        }
        let _ = shutdown.changed().await;
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
    }
}

impl FederationService {
    async fn listener(
        &self,
        trust: &Trust,
        addr: std::net::SocketAddr,
    ) -> Result<(tokio::net::TcpListener, SpiffeAcceptor), String> {
        // Its own policy, not the east-west one: only the configured peers
        // and the gateways of accepted trust domains, never a workload SVID.
        let tls = mtls_server_config(
            trust.material(),
            self.hub.listener_policy(),
            vec![b"h2".to_vec()],
        )
        .map_err(|e| e.to_string())?;
        let acceptor = SpiffeAcceptor::new(
            Arc::new(tls),
            trust.handshake_metrics.clone(),
            HANDSHAKE_TIMEOUT,
        );
        let listener = crate::net::upgradable_tcp_listener(addr, false)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| e.to_string())?;
        Ok((listener, acceptor))
    }
}

/// Keeps one dialler per target: new targets get one, removed ones stop.
async fn reconcile_diallers(
    hub: Arc<Hub>,
    mut targets: watch::Receiver<Vec<PeerTarget>>,
    connector: SpiffeConnector,
    connect_timeout: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut running: BTreeMap<String, (PeerTarget, watch::Sender<bool>, JoinHandle<()>)> =
        BTreeMap::new();
    loop {
        let wanted: Vec<PeerTarget> = targets.borrow_and_update().clone();
        running.retain(|_, (target, stop_one, _)| {
            let keep = wanted.contains(target);
            if !keep {
                info!(peer = %target.spiffe_id, "peer removed from the configuration; disconnecting");
                let _ = stop_one.send(true);
            }
            keep
        });
        for target in wanted {
            let key = format!("{}@{}", target.spiffe_id, target.address);
            if running.contains_key(&key) {
                continue;
            }
            let (stop_one, stop_rx) = watch::channel(false);
            let handle = tokio::spawn(dial(
                hub.clone(),
                target.clone(),
                connector.clone(),
                connect_timeout,
                stop_rx,
            ));
            running.insert(key, (target, stop_one, handle));
        }
        tokio::select! {
            _ = stop.changed() => break,
            changed = targets.changed() => if changed.is_err() { break },
        }
    }
    for (_, (_, stop_one, handle)) in running {
        let _ = stop_one.send(true);
        let _ = handle.await;
    }
}

async fn track_readiness(
    hub: Arc<Hub>,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(READINESS_INTERVAL);
    loop {
        let (ok, detail) = hub.readiness();
        readiness.set("federation", ok, detail);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
    }
}
