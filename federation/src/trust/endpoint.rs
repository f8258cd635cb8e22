//! SPIFFE federation: fetching a foreign trust domain's bundle from its bundle
//! endpoint (SPIFFE Trust Domain and Bundle §5).
//!
//! Two authentication profiles:
//! - `https_spiffe`: the endpoint presents an X509-SVID, authenticated as the
//!   configured endpoint SPIFFE ID against the trust domain's current bundle (a
//!   bootstrap bundle from a file until the first fetch; then each fetched bundle
//!   authenticates the next fetch, so root rotations flow through the endpoint);
//! - `https_web`: ordinary Web PKI with host name checks, against configured roots
//!   or the system's.
//!
//! A fetched bundle replaces the current one only if its `spiffe_sequence` is
//! newer; an older sequence is refused as a rollback. The next fetch follows the
//! bundle's `spiffe_refresh_hint` (clamped), or the configured interval. On
//! failure the last good bundle stays and the fetch is retried with exponential
//! backoff from [`FIRST_RETRY`], never later than the next interval nor
//! [`MAX_RETRY_AFTER_FAILURE`]: a peer that starts after us is picked up at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::bundle::{BundleError, MAX_BUNDLE_BYTES, TrustBundle};
use super::store::{BundleSource, DomainTrust};
use super::tls::{PeerPolicy, TlsMaterial, spiffe_client_config};
use crate::{SpiffeId, TrustDomain};

/// Shortest refresh interval honoured, whatever a bundle's hint says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest refresh interval honoured.
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// A failed fetch is retried at most this long after the failure.
pub const MAX_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// The first retry after a failure; each further failure doubles it.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// How long to wait after `failures` consecutive failures (at least one).
pub fn retry_delay(failures: u32, interval: Duration) -> Duration {
    let backoff = FIRST_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(16));
    backoff.min(MAX_RETRY_AFTER_FAILURE).min(interval)
}

/// How the bundle endpoint is authenticated.
#[derive(Debug, Clone)]
pub enum EndpointProfile {
    /// The endpoint presents this SPIFFE ID.
    HttpsSpiffe {
        /// The endpoint's SPIFFE ID; its trust domain is the endpoint's.
        endpoint_id: SpiffeId,
    },
    /// Web PKI against these roots.
    HttpsWeb {
        /// Roots for the endpoint's certificate.
        roots: Arc<RootCertStore>,
    },
}

/// One foreign trust domain's bundle endpoint.
#[derive(Debug, Clone)]
pub struct BundleEndpoint {
    /// The trust domain the endpoint speaks for.
    pub trust_domain: TrustDomain,
    /// `https://host[:port][/path]`.
    pub url: Uri,
    /// How to authenticate it.
    pub profile: EndpointProfile,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL lacks a host, or the host does not resolve.
    #[error("cannot resolve endpoint address: {0}")]
    Resolve(String),
    /// TCP connection failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// TLS handshake failed (including authentication of the endpoint).
    #[error("TLS: {0}")]
    Tls(String),
    /// HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// Non-200 answer.
    #[error("endpoint answered HTTP {0}")]
    Status(u16),
    /// The document is not a valid bundle.
    #[error("bundle {0}")]
    Bundle(#[from] BundleError),
    /// The whole fetch took too long.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A sequence number older than the bundle in use.
    #[error("spiffe_sequence {got} is older than the {have} in use; refusing a rollback")]
    Rollback {
        /// Sequence fetched.
        got: u64,
        /// Sequence in use.
        have: u64,
    },
    /// No sequence number, where the bundle in use has one.
    #[error("no spiffe_sequence, where the bundle in use has {have}; refusing a rollback")]
    MissingSequence {
        /// Sequence in use.
        have: u64,
    },
}

impl FetchError {
    /// Its `result` label.
    pub fn result(&self) -> FetchResult {
        match self {
            Self::Resolve(_) | Self::Connect(_) => FetchResult::ConnectError,
            Self::Tls(_) => FetchResult::TlsError,
            Self::Http(_) | Self::Status(_) => FetchResult::HttpError,
            Self::Bundle(_) => FetchResult::InvalidBundle,
            Self::Timeout(_) => FetchResult::Timeout,
            Self::Rollback { .. } | Self::MissingSequence { .. } => FetchResult::Rollback,
        }
    }
}

crate::label_enum! {
    /// How a fetch ended: the `result` label of
    /// `isthmus_trust_bundle_fetches_total`.
    pub enum FetchResult {
        /// A new bundle is in use.
        Updated => "updated",
        /// The same bundle as before.
        Unchanged => "unchanged",
        /// The endpoint could not be resolved or connected to.
        ConnectError => "connect_error",
        /// The TLS handshake with the endpoint failed.
        TlsError => "tls_error",
        /// The HTTP exchange failed or its status was not 200.
        HttpError => "http_error",
        /// The body is not a valid bundle.
        InvalidBundle => "invalid_bundle",
        /// No answer in time.
        Timeout => "timeout",
        /// An older sequence number than the bundle in use, or none.
        Rollback => "rollback",
    }
}

/// Fetches the bundle once, without applying it.
pub async fn fetch_bundle(
    material: &Arc<TlsMaterial>,
    endpoint: &BundleEndpoint,
    timeout: Duration,
) -> Result<TrustBundle, FetchError> {
    tokio::time::timeout(timeout, fetch_inner(material, endpoint))
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

async fn fetch_inner(
    material: &Arc<TlsMaterial>,
    endpoint: &BundleEndpoint,
) -> Result<TrustBundle, FetchError> {
    let host = endpoint
        .url
        .host()
        .ok_or_else(|| FetchError::Resolve("URL has no host".into()))?;
    // `[::1]` in a URL is `::1` to the resolver and in SNI.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = endpoint.url.port_u16().unwrap_or(443);
    let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| FetchError::Resolve(e.to_string()))?
        .collect();
    // Try each address in turn: "localhost" may resolve to ::1 first while the
    // endpoint listens on 127.0.0.1 only.
    let mut last_error = FetchError::Resolve(format!("{host} has no address"));
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) => last_error = FetchError::Connect(format!("{addr}: {e}")),
        }
    }
    let tcp = tcp.ok_or(last_error)?;
    let alpn = vec![b"http/1.1".to_vec()];
    let config = match &endpoint.profile {
        EndpointProfile::HttpsSpiffe { endpoint_id } => spiffe_client_config(
            material,
            PeerPolicy::exact(endpoint_id.clone()),
            false,
            alpn,
        )
        .map_err(|e| FetchError::Tls(e.to_string()))?,
        EndpointProfile::HttpsWeb { roots } => {
            let mut config = ClientConfig::builder_with_provider(material.provider().clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| FetchError::Tls(e.to_string()))?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = alpn;
            config
        }
    };
    let server_name =
        ServerName::try_from(host.clone()).map_err(|e| FetchError::Resolve(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| FetchError::Tls(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let path = endpoint
        .url
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let authority = endpoint
        .url
        .authority()
        .map_or(host.clone(), ToString::to_string);
    let request = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    if response.status() != StatusCode::OK {
        driver.abort();
        return Err(FetchError::Status(response.status().as_u16()));
    }
    let body = Limited::new(response.into_body(), MAX_BUNDLE_BYTES)
        .collect()
        .await
        .map_err(|e| FetchError::Http(format!("reading body: {e}")))?
        .to_bytes();
    driver.abort();
    Ok(TrustBundle::from_spiffe_json(
        endpoint.trust_domain.clone(),
        &body,
    )?)
}

/// Federation fetch metrics.
#[derive(Debug, Clone)]
pub struct FetchMetrics {
    fetches: IntCounterVec,
    sequence: IntGaugeVec,
}

impl FetchMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let fetches = IntCounterVec::new(
            Opts::new(
                "isthmus_trust_bundle_fetches_total",
                "Bundle endpoint fetches by trust domain and result (updated, unchanged, or why it failed).",
            ),
            &["trust_domain", "result"],
        )?;
        let sequence = IntGaugeVec::new(
            Opts::new(
                "isthmus_trust_bundle_sequence",
                "spiffe_sequence of the bundle in use for each federated trust domain.",
            ),
            &["trust_domain"],
        )?;
        registry.register(Box::new(fetches.clone()))?;
        registry.register(Box::new(sequence.clone()))?;
        Ok(Self { fetches, sequence })
    }

    /// Fetches of `td` with `result` so far.
    pub fn count(&self, td: &str, result: &str) -> u64 {
        self.fetches.with_label_values(&[td, result]).get()
    }
}

/// What one fetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// A new bundle is in use.
    Updated,
    /// Same bundle as before.
    Unchanged,
}

/// Keeps one foreign trust domain's bundle fresh from its endpoint.
pub struct BundleFetcher {
    material: Arc<TlsMaterial>,
    endpoint: BundleEndpoint,
    metrics: FetchMetrics,
    default_interval: Duration,
    timeout: Duration,
}

impl BundleFetcher {
    /// A fetcher for `endpoint` writing into `material`'s trust store.
    pub fn new(
        material: Arc<TlsMaterial>,
        endpoint: BundleEndpoint,
        metrics: FetchMetrics,
        default_interval: Duration,
        timeout: Duration,
    ) -> Self {
        Self {
            material,
            endpoint,
            metrics,
            default_interval,
            timeout,
        }
    }

    /// Fetches and, when newer, applies the bundle.
    pub async fn fetch_once(&self) -> Result<FetchOutcome, FetchError> {
        let td = self.endpoint.trust_domain.as_str();
        let result = async {
            let bundle = fetch_bundle(&self.material, &self.endpoint, self.timeout).await?;
            self.apply(bundle)
        }
        .await;
        let label = match &result {
            Ok(FetchOutcome::Updated) => FetchResult::Updated,
            Ok(FetchOutcome::Unchanged) => FetchResult::Unchanged,
            Err(e) => e.result(),
        };
        self.metrics
            .fetches
            .with_label_values(&[td, label.label()])
            .inc();
        result
    }

    fn apply(&self, bundle: TrustBundle) -> Result<FetchOutcome, FetchError> {
        let trust = self.material.trust();
        let current = trust.get(self.endpoint.trust_domain.as_str());
        let from_endpoint = current.filter(|c| matches!(c.source, BundleSource::Endpoint(_)));
        if let Some(current) = from_endpoint {
            match (bundle.sequence, current.bundle.sequence) {
                (Some(got), Some(have)) if got < have => {
                    return Err(FetchError::Rollback { got, have });
                }
                // Once a bundle carried a sequence, one without cannot
                // replace it: sequences only move forward.
                (None, Some(have)) => return Err(FetchError::MissingSequence { have }),
                (Some(got), Some(have)) if got == have => {
                    if bundle.authorities != current.bundle.authorities {
                        warn!(trust_domain = %self.endpoint.trust_domain, sequence = got,
                            "bundle content changed without a new spiffe_sequence; keeping the bundle in use");
                    }
                    return Ok(FetchOutcome::Unchanged);
                }
                _ if bundle == current.bundle => return Ok(FetchOutcome::Unchanged),
                _ => {}
            }
        }
        let sequence = bundle.sequence;
        let authorities = bundle.authorities.len();
        let domain = DomainTrust::new(
            bundle,
            BundleSource::Endpoint(self.endpoint.url.to_string()),
            self.material.provider(),
        )?;
        self.material
            .update_trust(|store| store.with(domain.clone()));
        if let Some(seq) = sequence {
            self.metrics
                .sequence
                .with_label_values(&[self.endpoint.trust_domain.as_str()])
                .set(i64::try_from(seq).unwrap_or(i64::MAX));
        }
        info!(trust_domain = %self.endpoint.trust_domain, url = %self.endpoint.url,
            sequence, authorities, "federated trust bundle updated from its endpoint");
        Ok(FetchOutcome::Updated)
    }

    /// When to fetch next after a success.
    fn next_interval(&self) -> Duration {
        self.material
            .trust()
            .get(self.endpoint.trust_domain.as_str())
            .and_then(|t| t.bundle.refresh_hint)
            .unwrap_or(self.default_interval)
            .clamp(MIN_REFRESH, MAX_REFRESH)
    }

    /// Fetches now and then on schedule until `stop` fires.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut failures = 0;
        loop {
            let wait = match self.fetch_once().await {
                Ok(_) => {
                    failures = 0;
                    self.next_interval()
                }
                Err(e) => {
                    failures += 1;
                    let wait = retry_delay(failures, self.next_interval());
                    warn!(trust_domain = %self.endpoint.trust_domain, url = %self.endpoint.url,
                        error = %e, retry_in = ?wait,
                        "bundle endpoint fetch failed; keeping the last good bundle");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_exponentially_within_bounds() {
        let hour = Duration::from_secs(3600);
        let secs = |n| Duration::from_secs(n);
        assert_eq!(retry_delay(1, hour), secs(1));
        assert_eq!(retry_delay(2, hour), secs(2));
        assert_eq!(retry_delay(5, hour), secs(16));
        assert_eq!(retry_delay(6, hour), secs(30));
        assert_eq!(retry_delay(u32::MAX, hour), secs(30));
        assert_eq!(
            retry_delay(5, secs(3)),
            secs(3),
            "never later than the next interval"
        );
    }
}
