//! The trust store: one bundle per trust domain, never merged, with the rustls
//! verification state each needs prebuilt. Immutable: updates make a new store,
//! published through an `ArcSwap`, so handshakes read it without locks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::bundle::{BundleError, TrustBundle};
use crate::TrustDomain;

/// Where a trust domain's bundle came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleSource {
    /// A file, watched for changes.
    File(String),
    /// A SPIFFE bundle endpoint.
    Endpoint(String),
    /// A peer gateway of that trust domain, over the peering protocol.
    Peer(String),
}

/// One trust domain's bundle and what verification needs from it.
#[derive(Clone)]
pub struct DomainTrust {
    /// The bundle.
    pub bundle: TrustBundle,
    /// Where it came from.
    pub source: BundleSource,
    /// When this content was first loaded.
    pub loaded_at: SystemTime,
    /// Strictly increasing with every content change of this trust domain's
    /// bundle (Unix milliseconds at first load): the sequence number published
    /// for bundles whose source has none, such as PEM files.
    pub revision: u64,
    /// The authorities as rustls roots.
    pub roots: Arc<RootCertStore>,
    /// Chain verification of client certificates against these roots.
    pub client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for DomainTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainTrust")
            .field("bundle", &self.bundle)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl DomainTrust {
    /// Prepares `bundle` for verification.
    pub fn new(
        bundle: TrustBundle,
        source: BundleSource,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, BundleError> {
        let mut roots = RootCertStore::empty();
        for (i, der) in bundle.authorities.iter().enumerate() {
            roots.add(der.clone()).map_err(|e| BundleError::Cert {
                what: format!("authority {}", i + 1),
                source: super::x509::CertError::Malformed(e.to_string()),
            })?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| BundleError::Cert {
                    what: "bundle".into(),
                    source: super::x509::CertError::Malformed(e.to_string()),
                })?;
        let loaded_at = SystemTime::now();
        Ok(Self {
            bundle,
            source,
            loaded_at,
            revision: unix_millis(loaded_at),
            roots,
            client_verifier,
        })
    }
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Bundles by trust domain.
#[derive(Debug, Default, Clone)]
pub struct TrustStore {
    domains: BTreeMap<TrustDomain, Arc<DomainTrust>>,
}

impl TrustStore {
    /// The trust for `td`, if any.
    pub fn get(&self, td: &str) -> Option<&Arc<DomainTrust>> {
        self.domains.get(td)
    }

    /// Every trust domain with its trust.
    pub fn iter(&self) -> impl Iterator<Item = (&TrustDomain, &Arc<DomainTrust>)> {
        self.domains.iter()
    }

    /// A copy of this store with `trust` for its trust domain. When the
    /// authorities are unchanged the original load time and revision are kept;
    /// otherwise the revision moves past the previous one.
    pub fn with(&self, mut trust: DomainTrust) -> Self {
        let td = trust.bundle.trust_domain.clone();
        if let Some(old) = self.domains.get(&td) {
            if old.bundle.authorities == trust.bundle.authorities {
                trust.loaded_at = old.loaded_at;
                trust.revision = old.revision;
            } else {
                trust.revision = trust.revision.max(old.revision + 1);
            }
        }
        let mut next = self.clone();
        next.domains.insert(td, Arc::new(trust));
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::ca;
    use std::time::Duration;

    #[test]
    fn revisions_grow_with_every_content_change_and_only_then() {
        let td: TrustDomain = "r.example".parse().unwrap();
        let provider = crate::trust::tls::crypto_provider();
        let domain = |pem: &str| {
            let bundle = TrustBundle::parse(td.clone(), pem.as_bytes()).unwrap();
            DomainTrust::new(bundle, BundleSource::File("f".into()), &provider).unwrap()
        };
        let (ca1, ca2) = (
            ca::create_ca(&td, Duration::from_secs(60)).unwrap(),
            ca::create_ca(&td, Duration::from_secs(60)).unwrap(),
        );
        let s1 = TrustStore::default().with(domain(&ca1.cert_pem));
        let r1 = s1.get("r.example").unwrap().revision;
        let s2 = s1.with(domain(&ca1.cert_pem));
        assert_eq!(s2.get("r.example").unwrap().revision, r1, "same content");
        // Two changes within the same millisecond still get distinct revisions.
        let s3 = s2.with(domain(&ca2.cert_pem));
        let s4 = s3.with(domain(&ca1.cert_pem));
        let (r3, r4) = (
            s3.get("r.example").unwrap().revision,
            s4.get("r.example").unwrap().revision,
        );
        assert!(r1 < r3 && r3 < r4, "{r1} {r3} {r4}");
    }
}
