//! SPIFFE authentication for rustls.
//!
//! Peers are authenticated by SPIFFE ID, never by DNS name:
//! - the leaf must be an X509-SVID leaf: exactly one URI SAN, a SPIFFE ID with
//!   a path, not a CA, key usage with `digitalSignature` and without
//!   `keyCertSign`/`cRLSign` ([`leaf_spiffe_id`](super::x509::CertInfo::leaf_spiffe_id), checked before the
//!   chain so each refusal gets its own label);
//! - its chain must validate against the bundle of *that ID's* trust domain, and
//!   only that one (bundles are never merged, so one domain's CA cannot vouch for
//!   another domain's identities);
//! - the ID must then be allowed by a [`PeerPolicy`] (exact IDs or whole trust
//!   domains).
//!
//! Pingora's rustls connector checks hostnames only and its listener has no
//! per-handshake hooks for this, so the checks live here, as rustls verifiers, and
//! every handshake outcome is counted by [`SpiffeAcceptor`] / [`SpiffeConnector`].
//! Certificates and bundles are read from [`TlsMaterial`] on each handshake, so a
//! rotation applies to the next handshake while established connections go on.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, Opts, Registry};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::store::TrustStore;
use super::svid::Svid;
use super::x509::{CertError, leaf_spiffe_id_of};
use crate::limits::LogLimit;
use crate::{SpiffeId, TrustDomain};

/// The process's crypto provider: ring, the one Pingora installs.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This gateway's SVID and the trust store, each swappable at run time.
#[derive(Debug)]
pub struct TlsMaterial {
    svid: ArcSwap<Svid>,
    trust: ArcSwap<TrustStore>,
    provider: Arc<CryptoProvider>,
}

impl TlsMaterial {
    /// Material with `svid` and `trust`.
    pub fn new(svid: Svid, trust: TrustStore, provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(Self {
            svid: ArcSwap::from_pointee(svid),
            trust: ArcSwap::from_pointee(trust),
            provider,
        })
    }

    /// The SVID in use now.
    pub fn svid(&self) -> Arc<Svid> {
        self.svid.load_full()
    }

    /// Replaces the SVID for new handshakes.
    pub fn set_svid(&self, svid: Svid) {
        self.svid.store(Arc::new(svid));
    }

    /// The trust store in use now.
    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.load_full()
    }

    /// Applies `f` to the trust store atomically (concurrent updates retry).
    pub fn update_trust(&self, f: impl Fn(&TrustStore) -> TrustStore) {
        self.trust.rcu(|current| Arc::new(f(current)));
    }

    /// The crypto provider.
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The provider's signature verification algorithms.
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

/// Path prefix of gateway SPIFFE IDs: `spiffe://<td>/isthmus/gateway/<name>`.
pub const GATEWAY_PATH_PREFIX: &str = "/isthmus/gateway/";

/// Which authenticated peers are allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerPolicy {
    ids: BTreeSet<SpiffeId>,
    trust_domains: BTreeSet<TrustDomain>,
    gateways_of: BTreeSet<TrustDomain>,
}

impl PeerPolicy {
    /// Allows exactly `id`.
    pub fn exact(id: SpiffeId) -> Self {
        Self {
            ids: BTreeSet::from([id]),
            ..Self::default()
        }
    }

    /// Allows the gateways (`/isthmus/gateway/*`) of `trust_domains`, and nothing
    /// else: the default for the east-west and federation listeners.
    pub fn gateways_of(trust_domains: impl IntoIterator<Item = TrustDomain>) -> Self {
        Self {
            gateways_of: trust_domains.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Allows exactly `ids` and the gateways (`/isthmus/gateway/*`) of
    /// `trust_domains`: the federation listener's policy, which never admits
    /// a workload SVID.
    pub fn peers(
        ids: impl IntoIterator<Item = SpiffeId>,
        trust_domains: impl IntoIterator<Item = TrustDomain>,
    ) -> Self {
        Self {
            ids: ids.into_iter().collect(),
            trust_domains: BTreeSet::new(),
            gateways_of: trust_domains.into_iter().collect(),
        }
    }

    /// Allows `ids` and every identity of `trust_domains`.
    pub fn new(
        ids: impl IntoIterator<Item = SpiffeId>,
        trust_domains: impl IntoIterator<Item = TrustDomain>,
    ) -> Self {
        Self {
            ids: ids.into_iter().collect(),
            trust_domains: trust_domains.into_iter().collect(),
            gateways_of: BTreeSet::new(),
        }
    }

    /// Whether `id` is allowed.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.ids.contains(id)
            || self.trust_domains.contains(id.trust_domain_str())
            || (self.gateways_of.contains(id.trust_domain_str())
                && id.path().starts_with(GATEWAY_PATH_PREFIX))
    }
}

/// Why a peer certificate was refused by the SPIFFE checks (beyond the chain
/// checks rustls/webpki report themselves).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpiffeVerifyError {
    /// The leaf is not an X509-SVID leaf: it does not carry exactly one valid
    /// SPIFFE ID, or it is a CA, or its key usage is not a leaf's.
    #[error("peer certificate {0}")]
    NotAnSvidLeaf(CertError),
    /// No bundle is known for the peer's trust domain.
    #[error("no trust bundle for trust domain {0:?}")]
    UnknownTrustDomain(String),
    /// Authenticated, but not allowed.
    #[error("{0} is not allowed by policy")]
    Unauthorized(SpiffeId),
}

impl SpiffeVerifyError {
    fn into_rustls(self) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }

    /// The metric label for this refusal.
    pub fn result(&self) -> HandshakeResult {
        match self {
            Self::NotAnSvidLeaf(e) => leaf_result(e),
            Self::UnknownTrustDomain(_) => HandshakeResult::UnknownTrustDomain,
            Self::Unauthorized(_) => HandshakeResult::Unauthorized,
        }
    }
}

/// The metric label for a certificate that is not an X509-SVID leaf.
fn leaf_result(e: &CertError) -> HandshakeResult {
    match e {
        CertError::NoUriSan => HandshakeResult::NoUriSan,
        CertError::MultipleUriSans(_) => HandshakeResult::MultipleUriSans,
        CertError::LeafIsCa => HandshakeResult::LeafIsCa,
        CertError::NoKeyUsage | CertError::NoDigitalSignature => {
            HandshakeResult::LeafNoDigitalSignature
        }
        CertError::SigningKeyUsage(_) => HandshakeResult::LeafSigningKeyUsage,
        CertError::Malformed(_) => HandshakeResult::BadCertificate,
        CertError::BadSpiffeId { .. } | CertError::RootSpiffeId(_) => HandshakeResult::BadSpiffeId,
    }
}

/// The SPIFFE ID of `leaf` (checked as an X509-SVID leaf) and the trust of its
/// domain.
fn identify<'a>(
    trust: &'a TrustStore,
    leaf: &CertificateDer<'_>,
) -> Result<(SpiffeId, &'a super::store::DomainTrust), Error> {
    let id =
        leaf_spiffe_id_of(leaf).map_err(|e| SpiffeVerifyError::NotAnSvidLeaf(e).into_rustls())?;
    let domain = trust.get(id.trust_domain_str()).ok_or_else(|| {
        SpiffeVerifyError::UnknownTrustDomain(id.trust_domain_str().to_owned()).into_rustls()
    })?;
    Ok((id, domain))
}

/// Server side: requires a client certificate and authenticates it by SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    material: Arc<TlsMaterial>,
    policy: Arc<ArcSwap<PeerPolicy>>,
}

impl SpiffeClientVerifier {
    /// A verifier reading trust from `material` and authorising with `policy`.
    pub fn new(material: Arc<TlsMaterial>, policy: Arc<ArcSwap<PeerPolicy>>) -> Self {
        Self { material, policy }
    }
}

/// The handshake-signature half of a verifier, the same for both sides:
/// checked with the algorithms of the verifier's `material`.
macro_rules! handshake_signatures_by_material {
    () => {
        handshake_signatures_by_material!(verify_tls12_signature, verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.material.algorithms().supported_schemes()
        }
    };
    // Each method calls the rustls function of the same name.
    ($($verify:ident),+) => {
        $(
            fn $verify(
                &self,
                message: &[u8],
                cert: &CertificateDer<'_>,
                dss: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, Error> {
                $verify(message, cert, dss, self.material.algorithms())
            }
        )+
    };
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Advertising CA names would leak the federation's topology; SPIFFE
        // clients present their one SVID regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let trust = self.material.trust();
        let (id, domain) = identify(&trust, end_entity)?;
        domain
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        if !self.policy.load().allows(&id) {
            return Err(SpiffeVerifyError::Unauthorized(id).into_rustls());
        }
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by_material!();
}

/// Client side: authenticates the server by SPIFFE ID, ignoring the SNI name
/// (which names the service, not the peer).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    material: Arc<TlsMaterial>,
    expected: PeerPolicy,
}

impl SpiffeServerVerifier {
    /// A verifier accepting servers allowed by `expected`.
    pub fn new(material: Arc<TlsMaterial>, expected: PeerPolicy) -> Self {
        Self { material, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let trust = self.material.trust();
        let (id, domain) = identify(&trust, end_entity)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &domain.roots,
            intermediates,
            now,
            self.material.algorithms().all,
        )?;
        if !self.expected.allows(&id) {
            return Err(SpiffeVerifyError::Unauthorized(id).into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_by_material!();
}

/// Presents the current SVID, as a server and as a client.
#[derive(Debug)]
pub struct SvidResolver(Arc<TlsMaterial>);

impl SvidResolver {
    /// A resolver for `material`'s SVID.
    pub fn new(material: Arc<TlsMaterial>) -> Self {
        Self(material)
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.svid().certified_key.clone())
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.svid().certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS versions offered: 1.3, and 1.2 for older mesh peers.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A server config requiring SPIFFE-authenticated clients allowed by `policy`.
pub fn mtls_server_config(
    material: &Arc<TlsMaterial>,
    policy: Arc<ArcSwap<PeerPolicy>>,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, Error> {
    let mut config = ServerConfig::builder_with_provider(material.provider.clone())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            material.clone(),
            policy,
        )))
        .with_cert_resolver(Arc::new(SvidResolver::new(material.clone())));
    config.alpn_protocols = alpn;
    Ok(config)
}

/// A server config presenting the SVID without asking clients for certificates
/// (the SPIFFE bundle endpoint's `https_spiffe` profile).
pub fn svid_server_config(material: &Arc<TlsMaterial>) -> Result<ServerConfig, Error> {
    Ok(
        ServerConfig::builder_with_provider(material.provider.clone())
            .with_protocol_versions(VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SvidResolver::new(material.clone()))),
    )
}

/// A client config presenting the SVID (when `present_svid`) and accepting only
/// servers allowed by `expected`.
pub fn spiffe_client_config(
    material: &Arc<TlsMaterial>,
    expected: PeerPolicy,
    present_svid: bool,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(material.provider.clone())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        // Not a weakening: SpiffeServerVerifier checks the chain against the
        // expected trust domain's bundle and the SPIFFE ID instead of a DNS name.
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            material.clone(),
            expected,
        )));
    let mut config = if present_svid {
        builder.with_client_cert_resolver(Arc::new(SvidResolver::new(material.clone())))
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = alpn;
    Ok(config)
}

/// The metric label for a failed handshake.
pub fn classify(error: &Error) -> HandshakeResult {
    match error {
        Error::NoCertificatesPresented => HandshakeResult::NoClientCert,
        Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer => HandshakeResult::UnknownCa,
            // An issuer with a trusted CA's name but not its key.
            CertificateError::BadSignature => HandshakeResult::BadSignature,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                HandshakeResult::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                HandshakeResult::NotYetValid
            }
            CertificateError::Other(OtherError(inner)) => inner
                .downcast_ref::<SpiffeVerifyError>()
                .map_or(HandshakeResult::BadCertificate, SpiffeVerifyError::result),
            _ => HandshakeResult::BadCertificate,
        },
        Error::AlertReceived(_) => HandshakeResult::PeerRejected,
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => HandshakeResult::Malformed,
        Error::PeerIncompatible(_) => HandshakeResult::Incompatible,
        _ => HandshakeResult::ProtocolError,
    }
}

/// The metric label for a failed handshake reported as an I/O error (as
/// tokio-rustls does).
pub fn classify_io(error: &std::io::Error) -> HandshakeResult {
    match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(e) => classify(e),
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => HandshakeResult::Eof,
        None if error.kind() == std::io::ErrorKind::TimedOut => HandshakeResult::Timeout,
        None => HandshakeResult::IoError,
    }
}

crate::label_enum! {
    /// Which end of a handshake this gateway was: the `side` label of
    /// `isthmus_tls_handshakes_total`.
    pub enum HandshakeSide {
        /// It accepted the connection.
        Server => "server",
        /// It opened the connection.
        Client => "client",
    }
}

crate::label_enum! {
    /// How a handshake ended: the `result` label of
    /// `isthmus_tls_handshakes_total`.
    pub enum HandshakeResult {
        /// Completed and authorised.
        Ok => "ok",
        /// Not terminated: an east-west passthrough connection, spliced as is.
        Passthrough => "passthrough",
        /// The chain does not end at a CA of the peer's trust domain.
        UnknownCa => "unknown_ca",
        /// An issuer with a trusted CA's name but not its key.
        BadSignature => "bad_signature",
        /// The certificate has expired.
        Expired => "expired",
        /// The certificate is not valid yet.
        NotYetValid => "not_yet_valid",
        /// No bundle is known for the peer's trust domain.
        UnknownTrustDomain => "unknown_trust_domain",
        /// Authenticated, but not allowed by policy.
        Unauthorized => "unauthorized",
        /// The client presented no certificate.
        NoClientCert => "no_client_cert",
        /// The leaf carries no URI SAN.
        NoUriSan => "no_uri_san",
        /// The leaf carries more than one URI SAN.
        MultipleUriSans => "multiple_uri_sans",
        /// The leaf's URI SAN is not a valid SPIFFE ID of a workload.
        BadSpiffeId => "bad_spiffe_id",
        /// The leaf is a CA certificate.
        LeafIsCa => "leaf_is_ca",
        /// The leaf may sign certificates or CRLs.
        LeafSigningKeyUsage => "leaf_signing_key_usage",
        /// The leaf lacks the digital signature key usage.
        LeafNoDigitalSignature => "leaf_no_digital_signature",
        /// Any other certificate problem.
        BadCertificate => "bad_certificate",
        /// The peer sent an alert: it refused this gateway's certificate.
        PeerRejected => "peer_rejected",
        /// Not a valid TLS message.
        Malformed => "malformed",
        /// No protocol version or cipher suite in common.
        Incompatible => "incompatible",
        /// Any other TLS protocol error.
        ProtocolError => "protocol_error",
        /// The peer closed the connection during the handshake.
        Eof => "eof",
        /// No handshake within the timeout.
        Timeout => "timeout",
        /// Another I/O error.
        IoError => "io_error",
        /// This gateway could not build the client configuration.
        ConfigError => "config_error",
    }
}

impl std::fmt::Display for HandshakeResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl HandshakeResult {
    /// Whether the peer's certificate is not an X509-SVID leaf because of
    /// what it may do (a CA, or key usages of one): worth an operator's WARN.
    fn is_leaf_misuse(self) -> bool {
        matches!(
            self,
            Self::LeafIsCa | Self::LeafSigningKeyUsage | Self::LeafNoDigitalSignature
        )
    }
}

/// At most one WARN per this interval about peers whose certificate is not an
/// X509-SVID leaf; the others go to DEBUG and are counted in the next WARN (the
/// metric counts every one). Such a certificate passed no chain check yet, so
/// anyone can send them in bulk.
const LEAF_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// `isthmus_tls_handshakes_total{side, result}`.
#[derive(Debug, Clone)]
pub struct HandshakeMetrics {
    handshakes: IntCounterVec,
    leaf_warnings: Arc<LogLimit>,
}

impl HandshakeMetrics {
    /// Registers the metric in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let handshakes = IntCounterVec::new(
            Opts::new(
                "isthmus_tls_handshakes_total",
                "TLS handshakes by side (server, client) and result (ok or why it failed).",
            ),
            &["side", "result"],
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        Ok(Self {
            handshakes,
            leaf_warnings: Arc::new(LogLimit::new(LEAF_WARN_INTERVAL)),
        })
    }

    /// Counts one outcome.
    pub fn record(&self, side: HandshakeSide, result: HandshakeResult) {
        self.handshakes
            .with_label_values(&[side.label(), result.label()])
            .inc();
    }

    /// Counts one failure; a peer certificate that is not an X509-SVID leaf is
    /// also logged, at WARN at most once per [`LEAF_WARN_INTERVAL`] (a peer, or
    /// a CA, issuing such certificates is worth an operator's attention), else
    /// at DEBUG. Other refusals are logged by the listener that knows the context.
    fn record_failure(&self, side: HandshakeSide, e: &HandshakeError) {
        self.record(side, e.result);
        if !e.result.is_leaf_misuse() {
            return;
        }
        let (side, result) = (side.label(), e.result.label());
        match self.leaf_warnings.allow() {
            Some(suppressed) => warn!(side, result, error = %e.message,
                suppressed, "TLS handshake refused: the peer's certificate is not an X509-SVID leaf"),
            None => debug!(side, result, error = %e.message,
                "TLS handshake refused: the peer's certificate is not an X509-SVID leaf"),
        }
    }

    /// Count so far (for tests and debug output).
    pub fn count(&self, side: &str, result: &str) -> u64 {
        self.handshakes.with_label_values(&[side, result]).get()
    }
}

/// A failed handshake: its metric label and the message to log.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed ({result}): {message}")]
pub struct HandshakeError {
    /// The metric label.
    pub result: HandshakeResult,
    /// Details for the log.
    pub message: String,
}

impl HandshakeError {
    fn from_io(e: &std::io::Error) -> Self {
        // rustls prints a verifier's own error with Debug; say it in words.
        let spiffe = e.get_ref().and_then(|e| match e.downcast_ref::<Error>() {
            Some(Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) => {
                inner.downcast_ref::<SpiffeVerifyError>()
            }
            _ => None,
        });
        Self {
            result: classify_io(e),
            message: spiffe.map_or_else(
                || e.to_string(),
                |s| format!("invalid peer certificate: {s}"),
            ),
        }
    }

    fn timeout(after: Duration) -> Self {
        Self {
            result: HandshakeResult::Timeout,
            message: format!("no handshake within {after:?}"),
        }
    }
}

/// The SPIFFE ID of the peer of an established connection.
fn peer_id(certs: Option<&[CertificateDer<'static>]>) -> Result<SpiffeId, HandshakeError> {
    let leaf = certs.and_then(<[_]>::first).ok_or(HandshakeError {
        result: HandshakeResult::NoClientCert,
        message: "peer presented no certificate".into(),
    })?;
    leaf_spiffe_id_of(leaf).map_err(|e| HandshakeError {
        result: leaf_result(&e),
        message: e.to_string(),
    })
}

/// Accepts mTLS connections from SPIFFE peers, counting every outcome.
///
/// Accepting is two steps so a listener can look at the ClientHello (its SNI)
/// before deciding to terminate: [`Self::read_client_hello`], then
/// [`Self::finish`]. [`Self::accept`] does both.
#[derive(Clone)]
pub struct SpiffeAcceptor {
    config: Arc<ServerConfig>,
    metrics: HandshakeMetrics,
    timeout: Duration,
}

impl SpiffeAcceptor {
    /// An acceptor for `config` that gives up on handshakes after `timeout`.
    pub fn new(config: Arc<ServerConfig>, metrics: HandshakeMetrics, timeout: Duration) -> Self {
        Self {
            config,
            metrics,
            timeout,
        }
    }

    /// The handshake metrics, for listeners that end a connection after the
    /// ClientHello themselves (e.g. passthrough).
    pub fn metrics(&self) -> &HandshakeMetrics {
        &self.metrics
    }

    /// Reads the ClientHello (within the handshake timeout). A failure (garbage,
    /// timeout) is counted here.
    pub async fn read_client_hello<IO>(
        &self,
        io: IO,
    ) -> Result<tokio_rustls::StartHandshake<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let outcome = match tokio::time::timeout(self.timeout, acceptor).await {
            Err(_) => Err(HandshakeError::timeout(self.timeout)),
            Ok(Err(e)) => Err(HandshakeError::from_io(&e)),
            Ok(Ok(start)) => Ok(start),
        };
        if let Err(e) = &outcome {
            self.metrics.record_failure(HandshakeSide::Server, e);
        }
        outcome
    }

    /// Completes a handshake whose ClientHello was read; returns the stream and
    /// the peer's ID. Every outcome is counted.
    pub async fn finish<IO>(
        &self,
        start: tokio_rustls::StartHandshake<IO>,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, Option<SpiffeId>), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let handshake = start.into_stream(self.config.clone());
        let outcome = match tokio::time::timeout(self.timeout, handshake).await {
            Err(_) => Err(HandshakeError::timeout(self.timeout)),
            Ok(Err(e)) => Err(HandshakeError::from_io(&e)),
            Ok(Ok(stream)) => {
                let certs = stream.get_ref().1.peer_certificates();
                // Without client auth there is no peer identity to report.
                match certs {
                    None => Ok((stream, None)),
                    Some(certs) => peer_id(Some(certs)).map(|id| (stream, Some(id))),
                }
            }
        };
        match &outcome {
            Ok(_) => self
                .metrics
                .record(HandshakeSide::Server, HandshakeResult::Ok),
            Err(e) => self.metrics.record_failure(HandshakeSide::Server, e),
        }
        outcome
    }

    /// Runs the whole server handshake on `io`.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, Option<SpiffeId>), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = self.read_client_hello(io).await?;
        self.finish(start).await
    }
}

/// Opens mTLS connections to SPIFFE peers, counting every outcome.
#[derive(Clone)]
pub struct SpiffeConnector {
    material: Arc<TlsMaterial>,
    metrics: HandshakeMetrics,
    timeout: Duration,
    alpn: Vec<Vec<u8>>,
}

impl SpiffeConnector {
    /// A connector presenting `material`'s SVID.
    pub fn new(
        material: Arc<TlsMaterial>,
        metrics: HandshakeMetrics,
        timeout: Duration,
        alpn: Vec<Vec<u8>>,
    ) -> Self {
        Self {
            material,
            metrics,
            timeout,
            alpn,
        }
    }

    /// Runs the client handshake on `io`, sending `sni` and accepting only a
    /// server allowed by `expected`.
    pub async fn connect<IO>(
        &self,
        io: IO,
        sni: ServerName<'static>,
        expected: PeerPolicy,
    ) -> Result<(tokio_rustls::client::TlsStream<IO>, SpiffeId), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.connect_with_alpn(io, sni, expected, self.alpn.clone())
            .await
    }

    /// [`Self::connect`] offering `alpn` instead of the connector's default.
    pub async fn connect_with_alpn<IO>(
        &self,
        io: IO,
        sni: ServerName<'static>,
        expected: PeerPolicy,
        alpn: Vec<Vec<u8>>,
    ) -> Result<(tokio_rustls::client::TlsStream<IO>, SpiffeId), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let outcome: Result<_, HandshakeError> = async {
            let config =
                spiffe_client_config(&self.material, expected, true, alpn).map_err(|e| {
                    HandshakeError {
                        result: HandshakeResult::ConfigError,
                        message: e.to_string(),
                    }
                })?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let stream = tokio::time::timeout(self.timeout, connector.connect(sni, io))
                .await
                .map_err(|_| HandshakeError::timeout(self.timeout))?
                .map_err(|e| HandshakeError::from_io(&e))?;
            let id = peer_id(stream.get_ref().1.peer_certificates())?;
            Ok((stream, id))
        }
        .await;
        match &outcome {
            Ok(_) => self
                .metrics
                .record(HandshakeSide::Client, HandshakeResult::Ok),
            Err(e) => self.metrics.record_failure(HandshakeSide::Client, e),
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_match_ids_domains_and_gateways() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let td = |s: &str| s.parse::<TrustDomain>().unwrap();
        let exact = PeerPolicy::exact(id("spiffe://a/x"));
        assert!(exact.allows(&id("spiffe://a/x")));
        assert!(!exact.allows(&id("spiffe://a/x/y")));
        let domains = PeerPolicy::new([], [td("b")]);
        assert!(domains.allows(&id("spiffe://b/anything")));
        assert!(!domains.allows(&id("spiffe://bb/anything")));
        let gateways = PeerPolicy::gateways_of([td("c")]);
        assert!(gateways.allows(&id("spiffe://c/isthmus/gateway/gw-1")));
        assert!(!gateways.allows(&id("spiffe://c/ns/default/sa/app")));
        assert!(!gateways.allows(&id("spiffe://c/isthmus/gatewayx")));
        assert!(!gateways.allows(&id("spiffe://d/isthmus/gateway/gw-1")));
    }
}
