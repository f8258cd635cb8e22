//! This gateway's X509-SVID: certificate chain, private key and the SPIFFE ID the
//! leaf carries, checked before use.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::x509::{CertError, CertInfo};
use crate::SpiffeId;

/// Why an SVID cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SvidError {
    /// The certificate file has no certificate.
    #[error("contains no PEM certificate")]
    NoCertificate,
    /// The certificate file is not valid PEM.
    #[error("is not valid PEM: {0}")]
    Pem(String),
    /// The key file has no usable private key.
    #[error("contains no PEM private key (PKCS#8, SEC1 or PKCS#1): {0}")]
    NoKey(String),
    /// The key type is not supported.
    #[error("holds a private key that cannot sign: {0}")]
    UnsupportedKey(String),
    /// The key does not belong to the leaf certificate.
    #[error("does not match the certificate's public key")]
    KeyMismatch,
    /// The leaf certificate is unusable.
    #[error("leaf certificate {0}")]
    Leaf(#[from] CertError),
    /// The leaf's SPIFFE ID is not the one this gateway must present.
    #[error("carries {found} but this gateway is {expected}")]
    WrongId {
        /// The ID in the certificate.
        found: SpiffeId,
        /// The ID the configuration asks for.
        expected: SpiffeId,
    },
    /// The leaf has expired.
    #[error("leaf certificate expired at {0}")]
    Expired(String),
}

/// A loaded, checked X509-SVID.
#[derive(Debug, Clone)]
pub struct Svid {
    /// The SPIFFE ID of the leaf.
    pub spiffe_id: SpiffeId,
    /// Chain and signing key, ready for rustls.
    pub certified_key: Arc<CertifiedKey>,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
    /// SHA-256 of the leaf, hex.
    pub fingerprint: String,
}

impl Svid {
    /// Parses a PEM certificate chain (leaf first) and PEM key, checking that the
    /// key matches, the leaf is an X509-SVID leaf (exactly one SPIFFE ID, not a
    /// CA, key usage with `digitalSignature` and without `keyCertSign`/`cRLSign`:
    /// the checks peers apply to it), and that it is `expected` when given.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        expected: Option<&SpiffeId>,
        provider: &CryptoProvider,
    ) -> Result<Self, SvidError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| SvidError::Pem(e.to_string()))?;
        let leaf = chain.first().ok_or(SvidError::NoCertificate)?;
        let info = CertInfo::parse(leaf)?;
        let spiffe_id = info.leaf_spiffe_id()?;
        if let Some(expected) = expected
            && *expected != spiffe_id
        {
            return Err(SvidError::WrongId {
                found: spiffe_id,
                expected: expected.clone(),
            });
        }
        if info.not_after < SystemTime::now() {
            return Err(SvidError::Expired(
                humantime::format_rfc3339_seconds(info.not_after).to_string(),
            ));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| SvidError::NoKey(e.to_string()))?;
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| SvidError::UnsupportedKey(e.to_string()))?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        certified_key
            .keys_match()
            .map_err(|_| SvidError::KeyMismatch)?;
        Ok(Self {
            spiffe_id,
            certified_key: Arc::new(certified_key),
            not_after: info.not_after,
            fingerprint: info.sha256,
        })
    }
}
