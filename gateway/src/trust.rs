//! The gateway's identity and trust at run time: the file-backed SVID and
//! bundles (with their watcher), the SPIFFE bundle endpoint fetchers, the peer
//! policy, and what `/debug/trust` shows. The mechanisms live in
//! `isthmus_federation::trust`; this module wires them to the configuration.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use isthmus_federation::trust::tls::crypto_provider;
use isthmus_federation::trust::{
    BundleEndpoint, BundleFetcher, BundleFile, BundleRole, CertInfo, EndpointProfile, FetchMetrics,
    FileMaterial, HandshakeMetrics, MaterialError, MaterialFiles, MaterialMetrics, PeerPolicy,
    TlsMaterial,
};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::config::Config;
use crate::config::model::{EndpointProfileConfig, IdentityConfig};
use crate::metrics::{self, NAMESPACE};

/// How long one bundle endpoint fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Identity and trust of a running gateway.
pub struct Trust {
    /// The SVID and bundles, re-read from their files.
    pub files: Arc<FileMaterial>,
    /// Who may connect to this gateway's mTLS listeners.
    pub policy: Arc<ArcSwap<PeerPolicy>>,
    /// Bundle endpoints of federated trust domains.
    pub endpoints: Vec<BundleEndpoint>,
    /// Fetch interval when a bundle has no refresh hint.
    pub refresh_interval: Duration,
    /// `isthmus_trust_bundle_*` fetch metrics.
    pub fetch_metrics: FetchMetrics,
    /// `isthmus_tls_handshakes_total`, recorded by the mTLS listeners and
    /// connectors of the data plane.
    pub handshake_metrics: HandshakeMetrics,
}

impl Trust {
    /// The live TLS material.
    pub fn material(&self) -> &Arc<TlsMaterial> {
        self.files.material()
    }
}

/// The files that make up the TLS material of `config`.
fn material_files(config: &Config, identity: &IdentityConfig) -> MaterialFiles {
    let mut bundles = vec![BundleFile {
        trust_domain: config.gateway.trust_domain.clone(),
        path: identity.bundle.clone(),
        field: "identity.bundle".into(),
        role: BundleRole::Static,
    }];
    for (i, fed) in config.trust.federated.iter().enumerate() {
        if let Some(path) = &fed.bundle {
            bundles.push(BundleFile {
                trust_domain: fed.trust_domain.clone(),
                path: path.clone(),
                field: format!("trust.federated[{i}].bundle"),
                // With an endpoint or opted-in peer pushes the file only
                // bootstraps: what those deliver is not rolled back by it.
                role: if fed.endpoint.is_some() || fed.accept_peer_bundles {
                    BundleRole::Bootstrap
                } else {
                    BundleRole::Static
                },
            });
        }
    }
    MaterialFiles {
        svid_cert: identity.cert.clone(),
        svid_key: identity.key.clone(),
        expected_id: config.spiffe_id(),
        bundles,
    }
}

/// The policy for peers connecting to this gateway: the configured allow lists,
/// or by default the gateways of this and every federated trust domain.
pub fn peer_policy(config: &Config) -> PeerPolicy {
    let trust = &config.trust;
    if trust.allow_ids.is_empty() && trust.allow_trust_domains.is_empty() {
        PeerPolicy::gateways_of(
            std::iter::once(config.gateway.trust_domain.clone())
                .chain(trust.federated.iter().map(|f| f.trust_domain.clone())),
        )
    } else {
        PeerPolicy::new(
            trust.allow_ids.iter().cloned(),
            trust.allow_trust_domains.iter().cloned(),
        )
    }
}

fn web_roots(field: &str, ca: Option<&std::path::Path>) -> Result<RootCertStore, MaterialError> {
    let mut roots = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = match ca {
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<_, _>>())
            .map_err(|e| MaterialError {
                field: field.to_owned(),
                message: format!("{}: {e}", path.display()),
            })?,
        None => rustls_native_certs::load_native_certs().map_err(|e| MaterialError {
            field: field.to_owned(),
            message: format!("cannot load the system's root certificates: {e}"),
        })?,
    };
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(MaterialError {
            field: field.to_owned(),
            message: "no usable root certificate".into(),
        });
    }
    Ok(roots)
}

fn endpoints(config: &Config) -> Result<Vec<BundleEndpoint>, Vec<MaterialError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, fed) in config.trust.federated.iter().enumerate() {
        let Some(endpoint) = &fed.endpoint else {
            continue;
        };
        let profile = match &endpoint.profile {
            EndpointProfileConfig::HttpsSpiffe { endpoint_spiffe_id } => {
                EndpointProfile::HttpsSpiffe {
                    endpoint_id: endpoint_spiffe_id.clone(),
                }
            }
            EndpointProfileConfig::HttpsWeb { endpoint_ca } => {
                match web_roots(
                    &format!("trust.federated[{i}].endpoint_ca"),
                    endpoint_ca.as_deref(),
                ) {
                    Ok(roots) => EndpointProfile::HttpsWeb {
                        roots: Arc::new(roots),
                    },
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                }
            }
        };
        match endpoint.endpoint_url.parse() {
            Ok(url) => out.push(BundleEndpoint {
                trust_domain: fed.trust_domain.clone(),
                url,
                profile,
            }),
            Err(e) => errors.push(MaterialError {
                field: format!("trust.federated[{i}].endpoint_url"),
                message: e.to_string(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Loads the identity and trust of `config` (none without `[identity]`),
/// registering metrics in `registry`. Every file problem is returned.
pub fn load(config: &Config, registry: &Registry) -> Result<Option<Trust>, Vec<MaterialError>> {
    let Some(identity) = &config.identity else {
        return Ok(None);
    };
    // Registration fails only on a duplicate metric name: a programming error
    // that every test building a gateway would catch.
    const UNIQUE: &str = "metric names are unique within the process";
    let material_metrics = MaterialMetrics::new(registry).expect(UNIQUE);
    let fetch_metrics = FetchMetrics::new(registry).expect(UNIQUE);
    let handshake_metrics = HandshakeMetrics::new(registry).expect(UNIQUE);
    let files = FileMaterial::load(
        material_files(config, identity),
        crypto_provider(),
        material_metrics,
    );
    let endpoints = endpoints(config);
    let (files, endpoints) = match (files, endpoints) {
        (Ok(files), Ok(endpoints)) => (files, endpoints),
        (files, endpoints) => {
            let mut errors = files.err().unwrap_or_default();
            errors.extend(endpoints.err().unwrap_or_default());
            return Err(errors);
        }
    };
    metrics::register(registry, Expiry::new(files.material().clone()));
    Ok(Some(Trust {
        files,
        policy: Arc::new(ArcSwap::from_pointee(peer_policy(config))),
        endpoints,
        refresh_interval: config.trust.refresh_interval,
        fetch_metrics,
        handshake_metrics,
    }))
}

/// Background service: the file watcher and one fetcher per bundle endpoint.
pub struct TrustService {
    /// What to keep fresh.
    pub trust: Arc<Trust>,
}

#[async_trait]
impl BackgroundService for TrustService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.trust.files.clone().watch(stop_rx.clone()));
        for endpoint in &self.trust.endpoints {
            info!(trust_domain = %endpoint.trust_domain, url = %endpoint.url,
                "fetching federated trust bundle from its endpoint");
            let fetcher = BundleFetcher::new(
                self.trust.material().clone(),
                endpoint.clone(),
                self.trust.fetch_metrics.clone(),
                self.trust.refresh_interval,
                FETCH_TIMEOUT,
            );
            tasks.spawn(fetcher.run(stop_rx.clone()));
        }
        let _ = shutdown.changed().await;
        let _ = stop_tx.send(true);
        while let Some(result) = tasks.join_next().await {
            if let Err(e) = result {
                warn!(error = %e, "trust task ended abnormally");
            }
        }
    }
}

/// `isthmus_tls_svid_expiry_seconds` and
/// `isthmus_trust_bundle_expiry_seconds{trust_domain}`: computed from the
/// material in use when gathered, so they count down between reloads and
/// follow every bundle source (files, endpoints, peers).
struct Expiry {
    material: Arc<TlsMaterial>,
    svid: IntGauge,
    bundles: IntGaugeVec,
    /// Concurrent scrapes take turns: each resets the bundle series.
    collecting: parking_lot::Mutex<()>,
}

impl Expiry {
    fn new(material: Arc<TlsMaterial>) -> Self {
        let svid = IntGauge::with_opts(
            Opts::new(
                "tls_svid_expiry_seconds",
                "Seconds until the SVID in use expires; negative once it has.",
            )
            .namespace(NAMESPACE),
        )
        .expect("static metric definition is valid");
        let bundles = IntGaugeVec::new(
            Opts::new(
                "trust_bundle_expiry_seconds",
                "Seconds until the earliest authority in each trust domain's bundle in use \
                 expires; negative once it has.",
            )
            .namespace(NAMESPACE),
            &["trust_domain"],
        )
        .expect("static metric definition is valid");
        Self {
            material,
            svid,
            bundles,
            collecting: parking_lot::Mutex::new(()),
        }
    }
}

/// Whole seconds from `now` to `t`, negative when `t` is past.
fn seconds_until(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
        Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

impl Collector for Expiry {
    fn desc(&self) -> Vec<&Desc> {
        let mut desc = self.svid.desc();
        desc.extend(self.bundles.desc());
        desc
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _turn = self.collecting.lock();
        let now = SystemTime::now();
        self.svid
            .set(seconds_until(self.material.svid().not_after, now));
        // Only the trust domains in use now: one removed loses its series.
        self.bundles.reset();
        for (td, domain) in self.material.trust().iter() {
            let earliest = domain
                .bundle
                .authorities
                .iter()
                .filter_map(|der| CertInfo::parse(der).ok())
                .map(|info| info.not_after)
                .min();
            if let Some(earliest) = earliest {
                self.bundles
                    .with_label_values(&[td.as_str()])
                    .set(seconds_until(earliest, now));
            }
        }
        let mut families = self.svid.collect();
        families.extend(self.bundles.collect());
        families
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `/debug/trust`: the SVID in use, every trust domain's bundle and the policy.
pub fn debug_json(trust: Option<&Trust>) -> Value {
    let Some(trust) = trust else {
        return json!({ "identity": null, "note": "no [identity] configured: mTLS is off" });
    };
    let material = trust.material();
    let svid = material.svid();
    let store = material.trust();
    let domains: Vec<Value> = store
        .iter()
        .map(|(td, domain)| {
            let authorities: Vec<Value> = domain
                .bundle
                .authorities
                .iter()
                .map(|der| match CertInfo::parse(der) {
                    Ok(info) => json!({
                        "subject": info.subject,
                        "sha256": info.sha256,
                        "not_after": rfc3339(info.not_after),
                    }),
                    Err(e) => json!({ "error": e.to_string() }),
                })
                .collect();
            json!({
                "trust_domain": td,
                "source": domain.source,
                "sequence": domain.bundle.sequence,
                "refresh_hint_seconds": domain.bundle.refresh_hint.map(|d| d.as_secs()),
                "loaded_at": rfc3339(domain.loaded_at),
                "authorities": authorities,
            })
        })
        .collect();
    json!({
        "identity": {
            "spiffe_id": svid.spiffe_id,
            "fingerprint_sha256": svid.fingerprint,
            "not_after": rfc3339(svid.not_after),
            "not_after_unix": unix(svid.not_after),
        },
        "trust_domains": domains,
        "peer_policy": *trust.policy.load_full(),
        "bundle_endpoints": trust.endpoints.iter().map(|e| json!({
            "trust_domain": e.trust_domain,
            "url": e.url.to_string(),
            "profile": match &e.profile {
                EndpointProfile::HttpsSpiffe { endpoint_id } => json!({"https_spiffe": endpoint_id}),
                EndpointProfile::HttpsWeb { .. } => json!("https_web"),
            },
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_federation::TrustDomain;
    use isthmus_federation::trust::ca::{create_ca, dev_material};
    use isthmus_federation::trust::{BundleSource, DomainTrust, TrustBundle};

    const DAY: u64 = 86_400;

    fn rendered(registry: &Registry) -> String {
        String::from_utf8(metrics::render(registry)).unwrap()
    }

    fn value(text: &str, series: &str) -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn expiry_counts_down_to_the_svid_and_each_domains_earliest_authority() {
        let (own, peer): (TrustDomain, TrustDomain) =
            ("own.test".parse().unwrap(), "peer.test".parse().unwrap());
        let own_ca = create_ca(&own, Duration::from_secs(10 * DAY)).unwrap();
        let peer_old = create_ca(&peer, Duration::from_secs(2 * DAY)).unwrap();
        let peer_new = create_ca(&peer, Duration::from_secs(30 * DAY)).unwrap();
        let id = "spiffe://own.test/gw".parse().unwrap();
        let material = dev_material(
            &own_ca,
            &id,
            &[("own.test", &own_ca)],
            Duration::from_secs(3600),
        )
        .unwrap();
        // The peer's bundle during a root rotation: old and new root.
        let both = format!("{}{}", peer_old.cert_pem, peer_new.cert_pem);
        let bundle = TrustBundle::parse(peer.clone(), both.as_bytes()).unwrap();
        let domain =
            DomainTrust::new(bundle, BundleSource::File("t".into()), material.provider()).unwrap();
        material.update_trust(|s| s.with(domain.clone()));

        let registry = Registry::new();
        metrics::register(&registry, Expiry::new(material));
        let text = rendered(&registry);
        let near = |series: &str, want: u64| {
            let got = value(&text, series).unwrap_or_else(|| panic!("{series} in {text}"));
            assert!(
                (got - want as i64).abs() <= 5,
                "{series} = {got}, want {want}"
            );
        };
        near("isthmus_tls_svid_expiry_seconds", 3600);
        near(
            "isthmus_trust_bundle_expiry_seconds{trust_domain=\"own.test\"}",
            10 * DAY,
        );
        near(
            "isthmus_trust_bundle_expiry_seconds{trust_domain=\"peer.test\"}",
            2 * DAY,
        );
    }

    #[test]
    fn seconds_until_is_negative_once_past() {
        let now = SystemTime::now();
        assert_eq!(seconds_until(now + Duration::from_secs(90), now), 90);
        assert_eq!(seconds_until(now - Duration::from_secs(90), now), -90);
    }
}
