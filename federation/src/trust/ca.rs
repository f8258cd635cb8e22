//! Development PKI: a trust domain CA and X509-SVIDs issued from it, with rcgen
//! (ECDSA P-256). Behind `isthmus ca init` / `isthmus ca issue`, the demo and the
//! tests. Production deployments bring SVIDs from their own CA (SPIRE,
//! cert-manager, ...); nothing else in Isthmus depends on this module.
//!
//! The certificates follow X509-SVID §4: the CA has `CA:TRUE` and key usage
//! `keyCertSign, cRLSign` (no `digitalSignature`, which only leaves carry); a
//! leaf has `CA:FALSE` and key usage `digitalSignature` only (an ECDSA key needs
//! neither `keyEncipherment` nor `keyAgreement`), plus `serverAuth, clientAuth`.
//! rcgen marks basic constraints and key usage critical, as §4.3 requires.

use std::time::{Duration, SystemTime};

/// Key usage bits for [`LeafSpec::key_usages`].
pub use rcgen::KeyUsagePurpose;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, SanType,
};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use super::x509::CertInfo;
use crate::{SpiffeId, TrustDomain};

/// Default validity of a development CA.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default validity of a development SVID.
pub const DEFAULT_SVID_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Backdating of `not_before`, so a peer whose clock runs a little behind accepts
/// a freshly issued certificate.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Error creating or using development PKI.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused the parameters.
    #[error("cannot create certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CA certificate or key could not be read.
    #[error("invalid CA material: {0}")]
    InvalidCa(String),
}

/// A CA certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct CaMaterial {
    /// The CA certificate (also the trust bundle of its trust domain).
    pub cert_pem: String,
    /// The CA's private key (PKCS#8).
    pub key_pem: String,
}

/// An issued SVID: certificate chain (leaf first) and key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// Leaf certificate.
    pub cert_pem: String,
    /// Private key (PKCS#8).
    pub key_pem: String,
}

/// Every knob of a leaf certificate, for tests that need broken ones too.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs; a valid SVID has exactly one SPIFFE ID.
    pub uris: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Mark the leaf as a CA (invalid for an SVID).
    pub is_ca: bool,
    /// Key usage bits; an X509-SVID leaf has `DigitalSignature` and neither
    /// `KeyCertSign` nor `CrlSign`. Empty leaves the extension out (invalid too).
    pub key_usages: Vec<KeyUsagePurpose>,
}

/// The key usage of an X509-SVID signing certificate (X509-SVID §4.3).
const CA_KEY_USAGES: [KeyUsagePurpose; 2] =
    [KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];

impl LeafSpec {
    /// A valid SVID spec for `id`, valid from a few minutes ago for `validity`.
    pub fn svid(id: &SpiffeId, validity: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            uris: vec![id.to_string()],
            not_before: now - CLOCK_SKEW,
            not_after: now + validity,
            is_ca: false,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
        }
    }
}

/// Creates a self-signed CA for `trust_domain`: `CA:TRUE`, keyCertSign and
/// cRLSign, and the URI SAN `spiffe://<td>` as X509-SVID §3.2 allows for signing
/// certificates.
pub fn create_ca(trust_domain: &TrustDomain, validity: Duration) -> Result<CaMaterial, CaError> {
    create_ca_with_key(trust_domain, validity, &KeyPair::generate()?)
}

/// [`create_ca`] with the given key (P-384, RSA, ... for tests that need
/// authorities of every key type).
pub fn create_ca_with_key(
    trust_domain: &TrustDomain,
    validity: Duration,
    key: &KeyPair,
) -> Result<CaMaterial, CaError> {
    let params = ca_params(trust_domain, SystemTime::now(), validity)?;
    let cert = params.self_signed(key)?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn ca_params(
    trust_domain: &TrustDomain,
    now: SystemTime,
    validity: Duration,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    dn.push(DnType::CommonName, "Isthmus development CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = CA_KEY_USAGES.to_vec();
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + validity).into();
    Ok(params)
}

/// Rebuilds the issuer of an existing CA from its certificate's subject and its
/// key; the authority key identifier is derived from the key, so it matches the
/// CA's subject key identifier.
fn issuer(ca: &CaMaterial) -> Result<Issuer<'static, KeyPair>, CaError> {
    let key =
        KeyPair::from_pem(&ca.key_pem).map_err(|e| CaError::InvalidCa(format!("key: {e}")))?;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())
        .map_err(|e| CaError::InvalidCa(format!("certificate: {e}")))?;
    let info = CertInfo::parse(&der).map_err(|e| CaError::InvalidCa(format!("certificate {e}")))?;
    if !info.is_ca {
        return Err(CaError::InvalidCa("certificate is not a CA".into()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    for (name, value) in &info.subject_attributes {
        match name.as_str() {
            "O" => dn.push(DnType::OrganizationName, value.as_str()),
            "CN" => dn.push(DnType::CommonName, value.as_str()),
            "OU" => dn.push(DnType::OrganizationalUnitName, value.as_str()),
            "C" => dn.push(DnType::CountryName, value.as_str()),
            other => {
                return Err(CaError::InvalidCa(format!(
                    "unsupported subject attribute {other} in CA certificate"
                )));
            }
        }
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = CA_KEY_USAGES.to_vec();
    Ok(Issuer::new(params, key))
}

/// Issues an X509-SVID for `id` from `ca`.
pub fn issue_svid(
    ca: &CaMaterial,
    id: &SpiffeId,
    validity: Duration,
) -> Result<IssuedSvid, CaError> {
    issue_leaf(ca, &LeafSpec::svid(id, validity))
}

/// Issues a leaf certificate exactly as `spec` says, valid or not.
pub fn issue_leaf(ca: &CaMaterial, spec: &LeafSpec) -> Result<IssuedSvid, CaError> {
    let issuer = issuer(ca)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    if let Some(uri) = spec.uris.first() {
        dn.push(DnType::CommonName, uri.rsplit('/').next().unwrap_or(uri));
    }
    params.distinguished_name = dn;
    params.subject_alt_names = spec
        .uris
        .iter()
        .map(|u| Ok(SanType::URI(u.as_str().try_into()?)))
        .collect::<Result<_, rcgen::Error>>()?;
    params.is_ca = if spec.is_ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    params.key_usages.clone_from(&spec.key_usages);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = spec.not_before.into();
    params.not_after = spec.not_after.into();
    let cert = params.signed_by(&key, &issuer)?;
    Ok(IssuedSvid {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Live TLS material for development and tests: an SVID for `id` issued by
/// `issuer`, trusting each `(trust domain, CA)` of `trusted`.
pub fn dev_material(
    issuer: &CaMaterial,
    id: &SpiffeId,
    trusted: &[(&str, &CaMaterial)],
    validity: Duration,
) -> Result<std::sync::Arc<super::TlsMaterial>, CaError> {
    let provider = super::tls::crypto_provider();
    let issued = issue_svid(issuer, id, validity)?;
    let svid = super::Svid::from_pem(
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        Some(id),
        &provider,
    )
    .map_err(|e| CaError::InvalidCa(format!("issued SVID: {e}")))?;
    let mut store = super::TrustStore::default();
    for (td, ca) in trusted {
        let td: TrustDomain = td
            .parse()
            .map_err(|e| CaError::InvalidCa(format!("trust domain {td:?}: {e}")))?;
        let bundle = super::TrustBundle::parse(td, ca.cert_pem.as_bytes())
            .map_err(|e| CaError::InvalidCa(format!("bundle {e}")))?;
        let domain =
            super::DomainTrust::new(bundle, super::BundleSource::File("dev".into()), &provider)
                .map_err(|e| CaError::InvalidCa(format!("bundle {e}")))?;
        store = store.with(domain);
    }
    Ok(super::TlsMaterial::new(svid, store, provider))
}

/// Checks that `pem` holds a private key rcgen or rustls can use.
pub fn is_private_key_pem(pem: &[u8]) -> bool {
    PrivateKeyDer::from_pem_slice(pem).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::TrustBundle;

    #[test]
    fn ca_and_svid_have_the_spiffe_shape() {
        let td: TrustDomain = "ca-test.example".parse().unwrap();
        let ca = create_ca(&td, DEFAULT_CA_VALIDITY).unwrap();
        let bundle = TrustBundle::parse(td.clone(), ca.cert_pem.as_bytes()).unwrap();
        assert_eq!(bundle.authorities.len(), 1);
        let ca_info = CertInfo::parse(&bundle.authorities[0]).unwrap();
        assert!(ca_info.is_ca);
        assert_eq!(ca_info.uri_sans, vec!["spiffe://ca-test.example"]);

        let id: SpiffeId = "spiffe://ca-test.example/isthmus/gateway/gw"
            .parse()
            .unwrap();
        let svid = issue_svid(&ca, &id, DEFAULT_SVID_VALIDITY).unwrap();
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(svid.cert_pem.as_bytes()).unwrap();
        let leaf = CertInfo::parse(&der).unwrap();
        assert!(!leaf.is_ca);
        assert_eq!(leaf.spiffe_id().unwrap(), id);
        assert!(is_private_key_pem(svid.key_pem.as_bytes()));
    }

    /// Reads the extensions straight from the DER with x509-parser (not through
    /// `CertInfo`, which the verifiers use, so a bug there cannot hide here).
    fn extensions(pem: &str) -> Extensions {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let bc = cert
            .basic_constraints()
            .unwrap()
            .map(|bc| (bc.critical, bc.value.ca));
        let ku = cert
            .key_usage()
            .unwrap()
            .map(|ku| (ku.critical, ku.value.flags));
        let eku = cert
            .extended_key_usage()
            .unwrap()
            .map(|eku| {
                let mut v = Vec::new();
                if eku.value.server_auth {
                    v.push("serverAuth".to_owned());
                }
                if eku.value.client_auth {
                    v.push("clientAuth".to_owned());
                }
                v
            })
            .unwrap_or_default();
        Extensions { bc, ku, eku }
    }

    /// (critical, CA), (critical, key usage flags), extended key usages.
    struct Extensions {
        bc: Option<(bool, bool)>,
        ku: Option<(bool, u16)>,
        eku: Vec<String>,
    }

    // RFC 5280 §4.2.1.3 bit positions, as x509-parser numbers them.
    const DIGITAL_SIGNATURE: u16 = 1;
    const KEY_CERT_SIGN: u16 = 1 << 5;
    const CRL_SIGN: u16 = 1 << 6;

    #[test]
    fn ca_and_svid_key_usage_follow_x509_svid() {
        let td: TrustDomain = "ku.example".parse().unwrap();
        let ca = create_ca(&td, DEFAULT_CA_VALIDITY).unwrap();
        // Signing certificate: CA:TRUE critical; keyCertSign + cRLSign only, critical.
        let Extensions { bc, ku, .. } = extensions(&ca.cert_pem);
        assert_eq!(bc, Some((true, true)), "basicConstraints (critical, CA)");
        assert_eq!(ku, Some((true, KEY_CERT_SIGN | CRL_SIGN)), "keyUsage");

        let id: SpiffeId = "spiffe://ku.example/isthmus/gateway/gw".parse().unwrap();
        let svid = issue_svid(&ca, &id, DEFAULT_SVID_VALIDITY).unwrap();
        // Leaf: CA:FALSE; digitalSignature only (ECDSA needs no keyEncipherment
        // or keyAgreement), critical; serverAuth and clientAuth.
        let Extensions { bc, ku, eku } = extensions(&svid.cert_pem);
        assert_eq!(bc.map(|(_, ca)| ca), Some(false), "basicConstraints CA");
        assert_eq!(ku, Some((true, DIGITAL_SIGNATURE)), "keyUsage");
        assert_eq!(eku, ["serverAuth", "clientAuth"]);
        // ...and it passes the leaf check the verifiers apply.
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(svid.cert_pem.as_bytes()).unwrap();
        assert_eq!(CertInfo::parse(&der).unwrap().leaf_spiffe_id().unwrap(), id);
    }

    #[test]
    fn the_leaf_check_refuses_each_violation() {
        use crate::trust::CertError;
        let td: TrustDomain = "ku.example".parse().unwrap();
        let ca = create_ca(&td, DEFAULT_CA_VALIDITY).unwrap();
        let id: SpiffeId = "spiffe://ku.example/workload".parse().unwrap();
        let check = |spec: LeafSpec| {
            let issued = issue_leaf(&ca, &spec).unwrap();
            let der = rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
                .unwrap();
            CertInfo::parse(&der).unwrap().leaf_spiffe_id()
        };
        let good = || LeafSpec::svid(&id, DEFAULT_SVID_VALIDITY);
        let with = |key_usages: Vec<KeyUsagePurpose>| LeafSpec {
            key_usages,
            ..good()
        };
        assert_eq!(check(good()).unwrap(), id);
        // keyEncipherment and keyAgreement are allowed beside digitalSignature.
        assert!(
            check(with(vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::KeyAgreement,
            ]))
            .is_ok()
        );
        assert_eq!(
            check(LeafSpec {
                is_ca: true,
                ..good()
            }),
            Err(CertError::LeafIsCa)
        );
        assert_eq!(
            check(with(vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign
            ])),
            Err(CertError::SigningKeyUsage("keyCertSign"))
        );
        assert_eq!(
            check(with(vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::CrlSign
            ])),
            Err(CertError::SigningKeyUsage("cRLSign"))
        );
        assert_eq!(
            check(with(vec![KeyUsagePurpose::KeyEncipherment])),
            Err(CertError::NoDigitalSignature)
        );
        assert_eq!(check(with(vec![])), Err(CertError::NoKeyUsage));
        assert!(matches!(
            check(LeafSpec {
                uris: vec!["spiffe://ku.example".into()],
                ..good()
            }),
            Err(CertError::RootSpiffeId(_))
        ));
    }
}
