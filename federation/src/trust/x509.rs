//! What we need to know about an X.509 certificate, read with x509-parser:
//! its SPIFFE ID (the single URI SAN), whether it is a CA, its validity window and
//! a fingerprint for people.

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
}

/// The parts of a certificate Isthmus looks at.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Every URI SAN, as written.
    pub uri_sans: Vec<String>,
    /// Basic constraints CA flag.
    pub is_ca: bool,
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
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
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
}

/// The SPIFFE ID of the leaf certificate `der`.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, CertError> {
    CertInfo::parse(der)?.spiffe_id()
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
