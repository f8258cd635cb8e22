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
}

/// One trust domain's bundle and what verification needs from it.
#[derive(Clone)]
pub struct DomainTrust {
    /// The bundle.
    pub bundle: TrustBundle,
    /// Where it came from.
    pub source: BundleSource,
    /// When this content was first loaded (a stand-in sequence for PEM bundles).
    pub loaded_at: SystemTime,
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
        Ok(Self {
            bundle,
            source,
            loaded_at: SystemTime::now(),
            roots,
            client_verifier,
        })
    }
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
    /// authorities are unchanged the original load time is kept.
    pub fn with(&self, mut trust: DomainTrust) -> Self {
        let td = trust.bundle.trust_domain.clone();
        if let Some(old) = self.domains.get(&td)
            && old.bundle.authorities == trust.bundle.authorities
        {
            trust.loaded_at = old.loaded_at;
        }
        let mut next = self.clone();
        next.domains.insert(td, Arc::new(trust));
        next
    }
}
