//! TLS material backed by files, and its rotation.
//!
//! [`FileMaterial`] loads the gateway's SVID (certificate chain + key) and the
//! bundle files it is configured with, and re-reads them when they change (file
//! watch) or when asked (SIGHUP). Each file is handled on its own: a bad new file
//! is logged, counted in `isthmus_tls_reload_errors_total{kind}` and changes
//! nothing, while good files beside it still apply. New handshakes use the new
//! material; established connections are never touched.
//!
//! Bundles are applied before the SVID in each pass, so an operator who replaces
//! both (new root, new SVID) at once sees both applied: the new SVID is checked
//! against the bundle it will be verified with.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::{RecursiveMode, Watcher};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use rustls::server::ParsedCertificate;
use tracing::{error, info, warn};

use super::bundle::TrustBundle;
use super::store::{BundleSource, DomainTrust, TrustStore};
use super::svid::Svid;
use super::tls::TlsMaterial;
use crate::{SpiffeId, TrustDomain};

/// A file-level problem, named by the configuration field that points at it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MaterialError {
    /// Dotted configuration path, e.g. `identity.cert`.
    pub field: String,
    /// What is wrong, including the file path.
    pub message: String,
}

impl MaterialError {
    fn new(field: &str, path: &Path, what: impl std::fmt::Display) -> Self {
        Self {
            field: field.to_owned(),
            message: format!("{}: {what}", path.display()),
        }
    }
}

/// How a bundle file is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleRole {
    /// The bundle of the trust domain, re-read whenever the file changes.
    Static,
    /// Trusted until the trust domain's bundle endpoint (or, where the
    /// operator opted in, one of its peers) delivers a bundle; later changes
    /// to the file are ignored once it has.
    Bootstrap,
}

/// One bundle file.
#[derive(Debug, Clone)]
pub struct BundleFile {
    /// The trust domain it speaks for.
    pub trust_domain: TrustDomain,
    /// Its path.
    pub path: PathBuf,
    /// Configuration field, for messages.
    pub field: String,
    /// Static or bootstrap.
    pub role: BundleRole,
}

/// Which files make up the gateway's TLS material.
#[derive(Debug, Clone)]
pub struct MaterialFiles {
    /// SVID certificate chain, PEM, leaf first (`identity.cert`).
    pub svid_cert: PathBuf,
    /// SVID private key, PEM (`identity.key`).
    pub svid_key: PathBuf,
    /// The SPIFFE ID the SVID must carry.
    pub expected_id: SpiffeId,
    /// Bundle files; the first is this gateway's own trust domain (`identity.bundle`).
    pub bundles: Vec<BundleFile>,
}

impl MaterialFiles {
    fn own_trust_domain(&self) -> &str {
        self.expected_id.trust_domain_str()
    }
}

crate::label_enum! {
    /// Which material a reload changed or rejected: the `kind` label of
    /// `isthmus_tls_reloads_total` and `isthmus_tls_reload_errors_total`.
    pub enum MaterialKind {
        /// The certificate and key this gateway presents.
        Svid => "svid",
        /// A trust bundle read from a file.
        Bundle => "bundle",
    }
}

/// Rotation metrics.
#[derive(Debug, Clone)]
pub struct MaterialMetrics {
    reload_errors: IntCounterVec,
    reloads: IntCounterVec,
    svid_expiry: IntGauge,
    bundle_authorities: IntGaugeVec,
}

impl MaterialMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reload_errors = IntCounterVec::new(
            Opts::new(
                "isthmus_tls_reload_errors_total",
                "Certificate, key or bundle files rejected on reload (the old material stays), by kind.",
            ),
            &["kind"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "isthmus_tls_reloads_total",
                "Certificate, key or bundle changes applied, by kind.",
            ),
            &["kind"],
        )?;
        let svid_expiry = IntGauge::new(
            "isthmus_tls_svid_expiry_timestamp_seconds",
            "Unix time at which the SVID in use expires.",
        )?;
        let bundle_authorities = IntGaugeVec::new(
            Opts::new(
                "isthmus_trust_bundle_authorities",
                "X.509 authorities in each trust domain's bundle.",
            ),
            &["trust_domain"],
        )?;
        registry.register(Box::new(reload_errors.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(svid_expiry.clone()))?;
        registry.register(Box::new(bundle_authorities.clone()))?;
        Ok(Self {
            reload_errors,
            reloads,
            svid_expiry,
            bundle_authorities,
        })
    }

    /// Rejected changes of `kind` (a [`MaterialKind`] label: tests read the
    /// exported value) so far.
    pub fn reload_errors(&self, kind: &str) -> u64 {
        self.reload_errors.with_label_values(&[kind]).get()
    }

    /// Records the state of `material` in the gauges.
    pub fn observe(&self, material: &TlsMaterial) {
        self.svid_expiry.set(unix_secs(material.svid().not_after));
        for (td, trust) in material.trust().iter() {
            self.bundle_authorities
                .with_label_values(&[td.as_str()])
                .set(trust.bundle.authorities.len() as i64);
        }
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads a file, bounded in size (certificates and bundles are small).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    const MAX: u64 = 4 << 20;
    let len = std::fs::metadata(path)?.len();
    if len > MAX {
        return Err(std::io::Error::other(format!(
            "is {len} bytes; certificate files are at most {MAX}"
        )));
    }
    std::fs::read(path)
}

fn read_file(field: &str, path: &Path) -> Result<Vec<u8>, MaterialError> {
    read_bounded(path).map_err(|e| MaterialError::new(field, path, format!("cannot be read: {e}")))
}

fn parse_bundle(
    file: &BundleFile,
    data: &[u8],
    provider: &Arc<CryptoProvider>,
) -> Result<DomainTrust, MaterialError> {
    let bundle = TrustBundle::parse(file.trust_domain.clone(), data)
        .map_err(|e| MaterialError::new(&file.field, &file.path, format!("bundle {e}")))?;
    DomainTrust::new(
        bundle,
        BundleSource::File(file.path.display().to_string()),
        provider,
    )
    .map_err(|e| MaterialError::new(&file.field, &file.path, format!("bundle {e}")))
}

fn parse_svid(
    files: &MaterialFiles,
    (cert, key): (&[u8], &[u8]),
    trust: &TrustStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Svid, MaterialError> {
    let svid = Svid::from_pem(cert, key, Some(&files.expected_id), provider).map_err(|e| {
        let field = match e {
            super::svid::SvidError::NoKey(_)
            | super::svid::SvidError::UnsupportedKey(_)
            | super::svid::SvidError::KeyMismatch => ("identity.key", &files.svid_key),
            _ => ("identity.cert", &files.svid_cert),
        };
        MaterialError::new(field.0, field.1, e)
    })?;
    // The SVID must validate against our own bundle, or every peer sharing that
    // bundle would refuse it.
    if let Some(own) = trust.get(files.own_trust_domain()) {
        let chain = svid.certified_key.cert.as_slice();
        let verified = ParsedCertificate::try_from(&chain[0]).and_then(|leaf| {
            verify_server_cert_signed_by_trust_anchor(
                &leaf,
                &own.roots,
                &chain[1..],
                UnixTime::now(),
                provider.signature_verification_algorithms.all,
            )
        });
        if let Err(e) = verified {
            return Err(MaterialError::new(
                "identity.cert",
                &files.svid_cert,
                format!(
                    "does not validate against the bundle of {} (identity.bundle): {e}; \
                     when rotating roots, publish the new root in the bundle first",
                    files.own_trust_domain()
                ),
            ));
        }
    }
    Ok(svid)
}

/// What one reload pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Descriptions of applied changes.
    pub applied: Vec<String>,
    /// Rejected files, each kept at its previous content.
    pub rejected: Vec<MaterialError>,
}

/// File-backed TLS material and its reloader.
pub struct FileMaterial {
    files: MaterialFiles,
    material: Arc<TlsMaterial>,
    metrics: MaterialMetrics,
    /// The bytes last processed per file (applied or rejected): an unchanged file
    /// is neither re-parsed nor re-reported on every event in its directory.
    seen: Mutex<HashMap<PathBuf, Vec<u8>>>,
}

impl FileMaterial {
    /// Loads every file, collecting every problem (for `check-config` and start-up).
    pub fn load(
        files: MaterialFiles,
        provider: Arc<CryptoProvider>,
        metrics: MaterialMetrics,
    ) -> Result<Arc<Self>, Vec<MaterialError>> {
        let mut errors = Vec::new();
        let mut seen = HashMap::new();
        let mut trust = TrustStore::default();
        for file in &files.bundles {
            let parsed = read_file(&file.field, &file.path).and_then(|data| {
                let domain = parse_bundle(file, &data, &provider)?;
                seen.insert(file.path.clone(), data);
                Ok(domain)
            });
            match parsed {
                Ok(domain) => trust = trust.with(domain),
                Err(e) => errors.push(e),
            }
        }
        let svid = read_file("identity.cert", &files.svid_cert)
            .and_then(|cert| Ok((cert, read_file("identity.key", &files.svid_key)?)))
            .and_then(|(cert, key)| {
                let svid = parse_svid(&files, (&cert, &key), &trust, &provider)?;
                seen.insert(files.svid_cert.clone(), cert);
                seen.insert(files.svid_key.clone(), key);
                Ok(svid)
            });
        let svid = match svid {
            Ok(svid) if errors.is_empty() => svid,
            Ok(_) => return Err(errors),
            Err(e) => {
                errors.push(e);
                return Err(errors);
            }
        };
        let material = TlsMaterial::new(svid, trust, provider);
        metrics.observe(&material);
        Ok(Arc::new(Self {
            files,
            material,
            metrics,
            seen: Mutex::new(seen),
        }))
    }

    /// The live material.
    pub fn material(&self) -> &Arc<TlsMaterial> {
        &self.material
    }

    /// The metrics.
    pub fn metrics(&self) -> &MaterialMetrics {
        &self.metrics
    }

    fn reject(&self, kind: MaterialKind, e: MaterialError, report: &mut ReloadReport) {
        self.metrics
            .reload_errors
            .with_label_values(&[kind.label()])
            .inc();
        let kind = kind.label();
        error!(field = %e.field, problem = %e.message,
            "{kind} rejected; the previous {kind} stays in use: {e}");
        report.rejected.push(e);
    }

    /// Re-reads every file that changed; applies what is valid, keeps the rest.
    pub fn reload(&self) -> ReloadReport {
        let mut report = ReloadReport::default();
        let provider = self.material.provider().clone();
        let mut own_bundle_changed = false;
        for file in &self.files.bundles {
            let data = match read_file(&file.field, &file.path) {
                Ok(data) => data,
                Err(e) => {
                    // A file briefly missing mid-rename reads again on the next event.
                    self.reject(MaterialKind::Bundle, e, &mut report);
                    continue;
                }
            };
            if self.seen.lock().get(&file.path) == Some(&data) {
                continue;
            }
            self.seen.lock().insert(file.path.clone(), data.clone());
            if file.role == BundleRole::Bootstrap
                && self
                    .material
                    .trust()
                    .get(file.trust_domain.as_str())
                    .is_some_and(|t| {
                        matches!(t.source, BundleSource::Endpoint(_) | BundleSource::Peer(_))
                    })
            {
                info!(trust_domain = %file.trust_domain, file = %file.path.display(),
                    "bootstrap bundle changed but the bundle from its endpoint or its peers is in use; ignored");
                continue;
            }
            match parse_bundle(file, &data, &provider) {
                Ok(domain) => {
                    let count = domain.bundle.authorities.len();
                    self.material
                        .update_trust(|store| store.with(domain.clone()));
                    own_bundle_changed |=
                        file.trust_domain.as_str() == self.files.own_trust_domain();
                    self.metrics
                        .reloads
                        .with_label_values(&[MaterialKind::Bundle.label()])
                        .inc();
                    info!(trust_domain = %file.trust_domain, file = %file.path.display(),
                        authorities = count, "trust bundle reloaded");
                    report.applied.push(format!(
                        "bundle {} ({count} authorities)",
                        file.trust_domain
                    ));
                }
                Err(e) => self.reject(MaterialKind::Bundle, e, &mut report),
            }
        }
        let files = &self.files;
        let svid_files = read_file("identity.cert", &files.svid_cert)
            .and_then(|cert| Ok((cert, read_file("identity.key", &files.svid_key)?)));
        let (cert, key) = match svid_files {
            Ok(pair) => pair,
            Err(e) => {
                self.reject(MaterialKind::Svid, e, &mut report);
                self.metrics.observe(&self.material);
                return report;
            }
        };
        let unchanged = {
            let seen = self.seen.lock();
            seen.get(&files.svid_cert) == Some(&cert) && seen.get(&files.svid_key) == Some(&key)
        };
        // A rejected SVID is retried when our own bundle changes: the usual
        // cause is a new SVID that arrived before its new root.
        if !unchanged || own_bundle_changed {
            {
                let mut seen = self.seen.lock();
                seen.insert(files.svid_cert.clone(), cert.clone());
                seen.insert(files.svid_key.clone(), key.clone());
            }
            let current = self.material.svid();
            match parse_svid(files, (&cert, &key), &self.material.trust(), &provider) {
                Ok(svid) if svid.fingerprint == current.fingerprint => {}
                Ok(svid) => {
                    info!(spiffe_id = %svid.spiffe_id, fingerprint = %svid.fingerprint,
                        expires = %humantime::format_rfc3339_seconds(svid.not_after),
                        "SVID reloaded");
                    report.applied.push(format!("svid {}", svid.fingerprint));
                    self.material.set_svid(svid);
                    self.metrics
                        .reloads
                        .with_label_values(&[MaterialKind::Svid.label()])
                        .inc();
                }
                Err(e) => self.reject(MaterialKind::Svid, e, &mut report),
            }
        }
        self.metrics.observe(&self.material);
        report
    }

    /// Every directory holding one of the files (watched non-recursively, so
    /// atomic renames and Kubernetes' symlink swaps are seen).
    fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .files
            .bundles
            .iter()
            .map(|b| b.path.as_path())
            .chain([
                self.files.svid_cert.as_path(),
                self.files.svid_key.as_path(),
            ])
            .map(|p| match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Watches the files' directories and reloads on change until `stop` fires.
    /// Bursts of events (an editor's save, a symlink swap) are coalesced.
    pub async fn watch(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        const SETTLE: Duration = Duration::from_millis(100);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reads are events too (inotify's open/close-nowrite): reacting to
            // them would make every reload, ours included, trigger the next.
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                error!(error = %e, "cannot watch certificate files; they are re-read on SIGHUP only");
                return;
            }
        };
        for dir in self.watched_dirs() {
            if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory; re-read on SIGHUP only");
            }
        }
        loop {
            tokio::select! {
                event = rx.recv() => {
                    if event.is_none() {
                        return;
                    }
                    // Let the burst settle, then drain it.
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                    let this = self.clone();
                    // File reads and certificate parsing are blocking work.
                    let _ = tokio::task::spawn_blocking(move || this.reload()).await;
                }
                _ = stop.changed() => return,
            }
        }
    }
}
