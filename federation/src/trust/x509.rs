//! What we need to know about an X.509 certificate, read with x509-parser:
//! its SPIFFE ID (the single URI SAN), whether it is a CA, its key usage, its
//! validity window and a fingerprint for people.
//!
//! [`CertInfo::leaf_spiffe_id`] is the X509-SVID leaf check (X509-SVID §4.1,
//! §4.3, §5.2) that every peer certificate and this gateway's own SVID pass
//! before use: exactly one URI SAN, a SPIFFE ID with a path, `CA:FALSE` (or no
//! basic constraints), and a key usage extension with `digitalSignature` and
//! neither `keyCertSign` nor `cRLSign`. webpki checks none of the key usage bits
//! of an end-entity certificate, so without this a certificate the trusted CA
//! issued for signing certificates would authenticate as a workload.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{SpiffeId, SpiffeIdError};

/// Why a certificate cannot be used as an SVID or an authority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Not a parsable DER X.509 certificate.
    #[error("is not a valid X.509 certificate: {0}")]
    Malformed(String),
    /// No URI SAN: an SVID must carry its SPIFFE ID.
    #[error("has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    /// More than one URI SAN: the SPIFFE ID would be ambiguous (X509-SVID §2).
    #[error("has {0} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("has URI SAN {uri:?}, which is not a SPIFFE ID: {source}")]
    BadSpiffeId {
        /// The URI as found.
        uri: String,
        /// Why it is not a SPIFFE ID.
        source: SpiffeIdError,
    },
    /// The SPIFFE ID names a trust domain, not a workload (X509-SVID §5.2).
    #[error("has SPIFFE ID {0} without a path; a leaf SVID's ID names a workload")]
    RootSpiffeId(SpiffeId),
    /// Basic constraints say CA (X509-SVID §4.1, §5.2).
    #[error("is a CA certificate (basicConstraints CA:TRUE); an X509-SVID leaf must have CA:FALSE")]
    LeafIsCa,
    /// No key usage extension (X509-SVID §4.3: it must be present).
    #[error("has no keyUsage extension; an X509-SVID leaf must have one with digitalSignature")]
    NoKeyUsage,
    /// Key usage without `digitalSignature` (X509-SVID §4.3).
    #[error("has a keyUsage without digitalSignature, which an X509-SVID leaf must have")]
    NoDigitalSignature,
    /// Key usage with `keyCertSign` and/or `cRLSign`, which only signing
    /// certificates may have (X509-SVID §4.3, §5.2).
    #[error("has keyUsage {0}, which only signing certificates may have, never an X509-SVID leaf")]
    SigningKeyUsage(&'static str),
}

/// The key usage bits Isthmus looks at (RFC 5280 §4.2.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUsage {
    /// `digitalSignature`: required on a leaf SVID.
    pub digital_signature: bool,
    /// `keyEncipherment`: allowed on a leaf SVID.
    pub key_encipherment: bool,
    /// `keyAgreement`: allowed on a leaf SVID.
    pub key_agreement: bool,
    /// `keyCertSign`: required on a signing certificate, forbidden on a leaf.
    pub key_cert_sign: bool,
    /// `cRLSign`: allowed on a signing certificate, forbidden on a leaf.
    pub crl_sign: bool,
    /// Whether the extension is marked critical (X509-SVID §4.3 says it must be).
    pub critical: bool,
}

/// The parts of a certificate Isthmus looks at.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Every URI SAN, as written.
    pub uri_sans: Vec<String>,
    /// Basic constraints CA flag.
    pub is_ca: bool,
    /// Whether the basic constraints extension is marked critical (false when
    /// it is absent).
    pub basic_constraints_critical: bool,
    /// The key usage extension, if present.
    pub key_usage: Option<KeyUsage>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Subject distinguished name, for messages.
    pub subject: String,
    /// Subject attributes (short name such as `O`, `CN`, value), in order.
    pub subject_attributes: Vec<(String, String)>,
    /// SHA-256 of the DER encoding, hex.
    pub sha256: String,
}

impl CertInfo {
    /// Parses `der`.
    pub fn parse(der: &[u8]) -> Result<Self, CertError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertError::Malformed(format!(
                "{} bytes of trailing data",
                rest.len()
            )));
        }
        let mut uri_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uri_sans.push((*uri).to_owned());
                }
            }
        }
        // A duplicated or unparsable extension makes the certificate malformed
        // rather than silently "not a CA" or "no key usage".
        let basic_constraints = cert
            .basic_constraints()
            .map_err(|e| CertError::Malformed(format!("basicConstraints: {e}")))?;
        let is_ca = basic_constraints.as_ref().is_some_and(|bc| bc.value.ca);
        let basic_constraints_critical = basic_constraints.is_some_and(|bc| bc.critical);
        let key_usage = cert
            .key_usage()
            .map_err(|e| CertError::Malformed(format!("keyUsage: {e}")))?
            .map(|ku| KeyUsage {
                digital_signature: ku.value.digital_signature(),
                key_encipherment: ku.value.key_encipherment(),
                key_agreement: ku.value.key_agreement(),
                key_cert_sign: ku.value.key_cert_sign(),
                crl_sign: ku.value.crl_sign(),
                critical: ku.critical,
            });
        let to_time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            }
        };
        let subject_attributes = cert
            .subject()
            .iter_attributes()
            .filter_map(|a| {
                let name = x509_parser::objects::oid2abbrev(
                    a.attr_type(),
                    x509_parser::objects::oid_registry(),
                )
                .ok()?;
                Some((name.to_owned(), a.as_str().ok()?.to_owned()))
            })
            .collect();
        Ok(Self {
            uri_sans,
            is_ca,
            basic_constraints_critical,
            key_usage,
            not_before: to_time(cert.validity().not_before),
            not_after: to_time(cert.validity().not_after),
            subject: cert.subject().to_string(),
            subject_attributes,
            sha256: sha256_hex(der),
        })
    }

    /// The SPIFFE ID this certificate carries as its single URI SAN.
    pub fn spiffe_id(&self) -> Result<SpiffeId, CertError> {
        match self.uri_sans.as_slice() {
            [] => Err(CertError::NoUriSan),
            [uri] => uri.parse().map_err(|source| CertError::BadSpiffeId {
                uri: uri.clone(),
                source,
            }),
            many => Err(CertError::MultipleUriSans(many.len())),
        }
    }

    /// The SPIFFE ID of this certificate as an X509-SVID leaf: [`Self::spiffe_id`]
    /// with a path, on a certificate that is not a CA and whose key usage has
    /// `digitalSignature` and neither `keyCertSign` nor `cRLSign`.
    /// (`keyEncipherment` and `keyAgreement` are allowed, as the spec allows.)
    pub fn leaf_spiffe_id(&self) -> Result<SpiffeId, CertError> {
        let id = self.spiffe_id()?;
        if id.path().is_empty() {
            return Err(CertError::RootSpiffeId(id));
        }
        if self.is_ca {
            return Err(CertError::LeafIsCa);
        }
        let ku = self.key_usage.ok_or(CertError::NoKeyUsage)?;
        match (ku.key_cert_sign, ku.crl_sign) {
            (true, true) => return Err(CertError::SigningKeyUsage("keyCertSign and cRLSign")),
            (true, false) => return Err(CertError::SigningKeyUsage("keyCertSign")),
            (false, true) => return Err(CertError::SigningKeyUsage("cRLSign")),
            (false, false) => {}
        }
        if !ku.digital_signature {
            return Err(CertError::NoDigitalSignature);
        }
        Ok(id)
    }
}

/// The SPIFFE ID of the certificate `der`, without the leaf checks.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, CertError> {
    CertInfo::parse(der)?.spiffe_id()
}

/// The SPIFFE ID of `der` as an X509-SVID leaf ([`CertInfo::leaf_spiffe_id`]).
pub fn leaf_spiffe_id_of(der: &[u8]) -> Result<SpiffeId, CertError> {
    CertInfo::parse(der)?.leaf_spiffe_id()
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
