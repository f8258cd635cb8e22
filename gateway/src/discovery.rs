//! The discovery sources at run time: one task per source of `[discovery]`
//! (see `isthmus_federation::discovery`), started, stopped and restarted as
//! reloads change the section, and the watched-file source, which lives here
//! because the `[[services]]` rules it applies live in [`crate::config`].
//!
//! Each source publishes into the hub as `file:<path>`, `dns:<ns>/<name>` or
//! `kubernetes:<kubeconfig|in-cluster>`. A source taken out of the
//! configuration has its services withdrawn; a source whose settings changed
//! is restarted and keeps its services until the new one has a view.
//!
//! Watched files are re-read when their directory changes (debounced by
//! [`FILE_DEBOUNCE`]) and on SIGHUP; a file that cannot be read or does not
//! validate keeps its previous services, and each problem is logged as
//! `<file>: services[2].endpoints[0]: ...`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use isthmus_federation::ClusterName;
use isthmus_federation::discovery::dns::{DnsSettings, DnsTarget};
use isthmus_federation::discovery::file::{FileWatcher, read_bounded};
use isthmus_federation::discovery::kubernetes::KubernetesSettings;
use isthmus_federation::discovery::{DiscoveryMetrics, FailureKind, Publish, SourceHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::Config;
pub use crate::config::discovery::FILE_DEBOUNCE;
use crate::config::discovery::{DiscoveryConfig, parse_services_file};

/// How often a file source whose directory cannot be watched polls it.
const FILE_POLL: Duration = Duration::from_secs(5);

/// What the sources should be, as of the last (re)load.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desired {
    cluster: ClusterName,
    config: DiscoveryConfig,
}

/// One source's settings; a change restarts it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Spec {
    File(PathBuf, ClusterName),
    Dns(Box<DnsTarget>, DnsSettings),
    Kubernetes(KubernetesSettings),
}

impl Desired {
    fn specs(&self) -> BTreeMap<String, Spec> {
        let mut out = BTreeMap::new();
        for path in &self.config.files {
            out.insert(
                format!("file:{}", path.display()),
                Spec::File(path.clone(), self.cluster.clone()),
            );
        }
        let settings = self.config.dns_settings();
        for d in &self.config.dns {
            out.insert(
                format!("dns:{}/{}", d.namespace, d.name),
                Spec::Dns(Box::new(d.target(&self.cluster)), settings.clone()),
            );
        }
        if let Some(k) = self.config.kubernetes_settings(&self.cluster) {
            out.insert(k.source_name(), Spec::Kubernetes(k));
        }
        out
    }
}

/// Tells the sources about reloads.
pub struct DiscoveryHandle {
    desired: watch::Sender<Desired>,
}

impl DiscoveryHandle {
    /// Applies `config`'s `[discovery]`.
    pub fn apply(&self, config: &Config) {
        self.desired.send_if_modified(|d| {
            let next = Desired {
                cluster: config.gateway.cluster.clone(),
                config: config.discovery.clone(),
            };
            let changed = *d != next;
            *d = next;
            changed
        });
    }
}

/// Runs the sources (inside the federation background service).
#[derive(Clone)]
pub struct DiscoveryRunner {
    sink: Arc<dyn Publish>,
    metrics: DiscoveryMetrics,
    desired: watch::Receiver<Desired>,
}

/// The handle and the runner for `config`'s sources, publishing into `sink`.
pub fn discovery(
    config: &Config,
    sink: Arc<dyn Publish>,
    registry: &prometheus::Registry,
) -> Result<(DiscoveryHandle, DiscoveryRunner), prometheus::Error> {
    let (desired, rx) = watch::channel(Desired {
        cluster: config.gateway.cluster.clone(),
        config: config.discovery.clone(),
    });
    Ok((
        DiscoveryHandle { desired },
        DiscoveryRunner {
            sink,
            metrics: DiscoveryMetrics::new(registry)?,
            desired: rx,
        },
    ))
}

struct Running {
    spec: Spec,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DiscoveryRunner {
    /// Runs the sources until `stop` fires, following reloads; SIGHUP re-reads
    /// the watched files.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut desired = self.desired.clone();
        let (reread_tx, reread) = watch::channel(0u64);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; watched files are re-read on change only");
                None
            }
        };
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        loop {
            let specs = desired.borrow_and_update().specs();
            let gone: Vec<String> = running
                .iter()
                .filter(|(name, r)| specs.get(*name) != Some(&r.spec))
                .map(|(name, _)| name.clone())
                .collect();
            for name in gone {
                let Some(r) = running.remove(&name) else {
                    continue;
                };
                let _ = r.stop.send(true);
                let _ = r.task.await;
                if !specs.contains_key(&name) {
                    info!(source = %name, "discovery source removed; its services are withdrawn");
                    SourceHandle::new(&name, self.sink.clone(), self.metrics.clone()).withdraw();
                }
            }
            for (name, spec) in specs {
                if running.contains_key(&name) {
                    continue;
                }
                info!(source = %name, "discovery source starting");
                let (stop_one, stop_rx) = watch::channel(false);
                let handle = SourceHandle::new(&name, self.sink.clone(), self.metrics.clone());
                let task = match spec.clone() {
                    Spec::File(path, cluster) => {
                        tokio::spawn(run_file(path, cluster, handle, reread.clone(), stop_rx))
                    }
                    Spec::Dns(target, settings) => tokio::spawn(
                        isthmus_federation::discovery::dns::run(*target, settings, handle, stop_rx),
                    ),
                    Spec::Kubernetes(settings) => tokio::spawn(
                        isthmus_federation::discovery::kubernetes::run(settings, handle, stop_rx),
                    ),
                };
                running.insert(
                    name,
                    Running {
                        spec,
                        stop: stop_one,
                        task,
                    },
                );
            }
            tokio::select! {
                _ = stop.changed() => break,
                changed = desired.changed() => if changed.is_err() { break },
                Some(()) = async {
                    match &mut hangup {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    info!("SIGHUP: re-reading watched service files");
                    reread_tx.send_modify(|n| *n += 1);
                }
            }
        }
        for (_, r) in running {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
    }
}

/// What a file source read last, so unchanged content is not parsed again.
#[derive(Default)]
struct Seen {
    bytes: Option<Vec<u8>>,
    /// The last read failed (logged once until it changes).
    read_error: Option<String>,
}

/// Reads and applies `path`; see the module docs.
fn load(path: &Path, cluster: &ClusterName, handle: &mut SourceHandle, seen: &mut Seen) {
    let bytes = match read_bounded(path) {
        Ok(b) => b,
        Err(e) => {
            let e = e.to_string();
            if seen.read_error.as_deref() != Some(&e) {
                error!(
                    source = handle.name(),
                    file = %path.display(),
                    error = %e,
                    "{}: cannot be read: {e}; keeping its previous services",
                    path.display()
                );
            }
            handle.failed(FailureKind::Read);
            seen.read_error = Some(e);
            seen.bytes = None;
            return;
        }
    };
    seen.read_error = None;
    if seen.bytes.as_ref() == Some(&bytes) {
        return;
    }
    let origin = path.display().to_string();
    let parsed = std::str::from_utf8(&bytes)
        .map_err(|e| {
            crate::config::ConfigErrors::from(crate::config::ConfigError::new(
                &origin,
                format!("is not UTF-8: {e}"),
            ))
        })
        .and_then(|text| parse_services_file(text, &origin));
    seen.bytes = Some(bytes);
    match parsed {
        Ok(services) => {
            handle.publish(services.iter().map(|s| s.local_service(cluster)).collect());
        }
        Err(errors) => {
            for e in &errors.0 {
                error!(
                    source = handle.name(),
                    file = %origin,
                    path = %e.path,
                    problem = %e.message,
                    "{origin}: {e}"
                );
            }
            error!(
                source = handle.name(),
                file = %origin,
                problems = errors.0.len(),
                "{origin} rejected; its previous services stay in force"
            );
            handle.failed(FailureKind::Invalid);
        }
    }
}

/// The watched-file source: reads `path` now, then on every change and
/// SIGHUP, until `stop` fires.
pub async fn run_file(
    path: PathBuf,
    cluster: ClusterName,
    mut handle: SourceHandle,
    mut reread: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = Seen::default();
    let mut watcher: Option<FileWatcher> = None;
    let mut watch_error: Option<String> = None;
    loop {
        if watcher.is_none() {
            match FileWatcher::new(&path, FILE_DEBOUNCE) {
                Ok(w) => {
                    watcher = Some(w);
                    watch_error = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if watch_error.as_deref() != Some(&e) {
                        warn!(
                            source = handle.name(),
                            file = %path.display(),
                            error = %e,
                            "cannot watch {}'s directory; polling it every {}s",
                            path.display(),
                            FILE_POLL.as_secs()
                        );
                        handle.failed(FailureKind::Watch);
                    }
                    watch_error = Some(e);
                }
            }
        }
        load(&path, &cluster, &mut handle, &mut seen);
        tokio::select! {
            _ = async {
                match &mut watcher {
                    Some(w) => w.changed().await,
                    None => tokio::time::sleep(FILE_POLL).await,
                }
            } => {}
            changed = reread.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests;
