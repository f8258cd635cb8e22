//! Trust bundles: the X.509 authorities of one trust domain, read from PEM or from
//! the SPIFFE bundle format (SPIFFE Trust Domain and Bundle §4: a JWK Set whose
//! `keys[]` with `use: "x509-svid"` carry one CA certificate each in `x5c`).
//!
//! Parsing is strict where the specification is (`keys` must be present, an
//! `x509-svid` key has exactly one `x5c` certificate, which must be a CA) and
//! lenient where it says so (unknown `kty` or `use`: the key is ignored).

use std::time::Duration;

use base64::Engine;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde::Deserialize;
use serde_json::Value;

use super::x509::{CertError, CertInfo};
use crate::TrustDomain;

/// Largest bundle document accepted, from a file or a bundle endpoint.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// Why a bundle was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Larger than [`MAX_BUNDLE_BYTES`].
    #[error("is {0} bytes; at most {MAX_BUNDLE_BYTES} are accepted")]
    TooLarge(usize),
    /// Not JSON where JSON was expected.
    #[error("is not a valid SPIFFE bundle (JSON): {0}")]
    Json(String),
    /// JSON without the `keys` array.
    #[error("has no \"keys\" array")]
    NoKeys,
    /// A key entry is not a JSON object.
    #[error("keys[{0}] is not an object")]
    KeyNotObject(usize),
    /// An `x509-svid` key whose `x5c` is missing or does not hold exactly one entry.
    #[error(
        "keys[{index}]: an x509-svid key needs exactly one certificate in \"x5c\", found {found}"
    )]
    X5cCount {
        /// Index in `keys`.
        index: usize,
        /// How many were found.
        found: usize,
    },
    /// `x5c` entry that is not standard base64.
    #[error("keys[{index}].x5c[0] is not base64: {reason}")]
    X5cBase64 {
        /// Index in `keys`.
        index: usize,
        /// Decoder message.
        reason: String,
    },
    /// `spiffe_sequence` is not a non-negative integer.
    #[error("\"spiffe_sequence\" must be a non-negative integer")]
    BadSequence,
    /// `spiffe_refresh_hint` is not a positive integer.
    #[error("\"spiffe_refresh_hint\" must be a positive integer (seconds)")]
    BadRefreshHint,
    /// PEM that does not parse.
    #[error("is not valid PEM: {0}")]
    Pem(String),
    /// A private key inside a bundle file: almost certainly the wrong file.
    #[error("contains a private key; a bundle holds only CA certificates")]
    ContainsPrivateKey,
    /// A certificate that cannot serve as an authority.
    #[error("{what} {source}")]
    Cert {
        /// Which certificate, e.g. `keys[2]` or `certificate 1`.
        what: String,
        /// What is wrong with it.
        source: CertError,
    },
    /// A certificate that is not a CA.
    #[error("{0} is not a CA certificate (basicConstraints CA:TRUE is required)")]
    NotCa(String),
    /// No X.509 authority at all.
    #[error("contains no X.509 authorities")]
    Empty,
}

/// The X.509 authorities of one trust domain, with the SPIFFE bundle metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// The trust domain these authorities speak for.
    pub trust_domain: TrustDomain,
    /// Root (and intermediate) CA certificates, DER.
    pub authorities: Vec<CertificateDer<'static>>,
    /// `spiffe_sequence`, when the source has one.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, when the source has one.
    pub refresh_hint: Option<Duration>,
}

impl TrustBundle {
    /// Parses `data` as a SPIFFE bundle (if it starts with `{`) or PEM.
    pub fn parse(trust_domain: TrustDomain, data: &[u8]) -> Result<Self, BundleError> {
        if data.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(data.len()));
        }
        let first = data.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{') {
            Self::from_spiffe_json(trust_domain, data)
        } else {
            Self::from_pem(trust_domain, data)
        }
    }

    /// Parses PEM `CERTIFICATE` blocks; other blocks are ignored, except private
    /// keys, which are an error.
    pub fn from_pem(trust_domain: TrustDomain, data: &[u8]) -> Result<Self, BundleError> {
        let mut authorities = Vec::new();
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(data) {
            let (kind, der) = item.map_err(|e| BundleError::Pem(e.to_string()))?;
            match kind {
                SectionKind::Certificate => {
                    let what = format!("certificate {}", authorities.len() + 1);
                    check_authority(&what, &der)?;
                    authorities.push(CertificateDer::from(der));
                }
                SectionKind::PrivateKey
                | SectionKind::RsaPrivateKey
                | SectionKind::EcPrivateKey => {
                    return Err(BundleError::ContainsPrivateKey);
                }
                _ => {}
            }
        }
        if authorities.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(Self {
            trust_domain,
            authorities,
            sequence: None,
            refresh_hint: None,
        })
    }

    /// Parses the SPIFFE bundle format.
    pub fn from_spiffe_json(trust_domain: TrustDomain, data: &[u8]) -> Result<Self, BundleError> {
        #[derive(Deserialize)]
        struct JwkSet {
            keys: Option<Vec<Value>>,
            spiffe_sequence: Option<Value>,
            spiffe_refresh_hint: Option<Value>,
        }
        if data.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(data.len()));
        }
        let set: JwkSet =
            serde_json::from_slice(data).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = set.keys.ok_or(BundleError::NoKeys)?;
        let sequence = match set.spiffe_sequence {
            None => None,
            Some(v) => Some(v.as_u64().ok_or(BundleError::BadSequence)?),
        };
        let refresh_hint = match set.spiffe_refresh_hint {
            None => None,
            Some(v) => match v.as_u64() {
                Some(secs) if secs > 0 => Some(Duration::from_secs(secs)),
                _ => return Err(BundleError::BadRefreshHint),
            },
        };
        let mut authorities = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let key = key.as_object().ok_or(BundleError::KeyNotObject(index))?;
            // §4.2.1/§4.2.2: unknown key types and uses are ignored, whole.
            let known_kty = matches!(
                key.get("kty").and_then(Value::as_str),
                Some("EC" | "RSA" | "OKP")
            );
            if key.get("use").and_then(Value::as_str) != Some("x509-svid") || !known_kty {
                continue;
            }
            let x5c = key.get("x5c").and_then(Value::as_array);
            let [cert] = x5c.map(Vec::as_slice).unwrap_or_default() else {
                return Err(BundleError::X5cCount {
                    index,
                    found: x5c.map_or(0, Vec::len),
                });
            };
            let b64 = cert.as_str().unwrap_or_default();
            let der = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| BundleError::X5cBase64 {
                    index,
                    reason: e.to_string(),
                })?;
            check_authority(&format!("keys[{index}]"), &der)?;
            authorities.push(CertificateDer::from(der));
        }
        if authorities.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(Self {
            trust_domain,
            authorities,
            sequence,
            refresh_hint,
        })
    }

    /// Serialises as a SPIFFE bundle (X.509 authorities only), with `sequence`
    /// and `refresh_hint` as given.
    pub fn to_spiffe_json(&self, sequence: u64, refresh_hint: Option<Duration>) -> String {
        let keys: Vec<Value> = self
            .authorities
            .iter()
            .map(|der| {
                serde_json::json!({
                    "use": "x509-svid",
                    "kty": key_type(der),
                    "x5c": [base64::engine::general_purpose::STANDARD.encode(der)],
                })
            })
            .collect();
        let mut doc = serde_json::json!({ "keys": keys, "spiffe_sequence": sequence });
        if let Some(hint) = refresh_hint {
            doc["spiffe_refresh_hint"] = Value::from(hint.as_secs().max(1));
        }
        doc.to_string()
    }

    /// The authorities as PEM.
    pub fn to_pem(&self) -> String {
        self.authorities
            .iter()
            .map(|der| pem_certificate(der))
            .collect()
    }
}

/// One certificate as a PEM block.
pub fn pem_certificate(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn check_authority(what: &str, der: &[u8]) -> Result<(), BundleError> {
    let info = CertInfo::parse(der).map_err(|source| BundleError::Cert {
        what: what.to_owned(),
        source,
    })?;
    if !info.is_ca {
        return Err(BundleError::NotCa(what.to_owned()));
    }
    Ok(())
}

/// The JWK `kty` of a certificate's public key (RFC 7518 §6.1).
fn key_type(der: &[u8]) -> &'static str {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return "EC";
    };
    let alg = cert.public_key().algorithm.algorithm.to_id_string();
    match alg.as_str() {
        "1.2.840.113549.1.1.1" => "RSA",
        "1.3.101.112" | "1.3.101.113" => "OKP",
        _ => "EC",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::ca;

    fn td() -> TrustDomain {
        "example.com".parse().unwrap()
    }

    fn ca_der() -> (String, Vec<u8>) {
        let ca = ca::create_ca(&td(), Duration::from_secs(3600)).unwrap();
        let der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
        (ca.cert_pem, der.to_vec())
    }

    fn b64(der: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(der)
    }

    /// The shape of the specification's Appendix A, trust bundle #1 and #2.
    #[test]
    fn spec_appendix_a_bundles() {
        let (_, cert1) = ca_der();
        let (_, cert2) = ca_der();
        let bundle1 = format!(
            r#"{{"spiffe_sequence": 1, "spiffe_refresh_hint": 2419200,
                "keys": [{{"kty": "RSA", "use": "x509-svid", "x5c": ["{}"], "n": "AQAB", "e": "AQAB"}}]}}"#,
            b64(&cert1)
        );
        let b = TrustBundle::parse(td(), bundle1.as_bytes()).unwrap();
        assert_eq!(b.sequence, Some(1));
        assert_eq!(b.refresh_hint, Some(Duration::from_secs(2_419_200)));
        assert_eq!(b.authorities, vec![CertificateDer::from(cert1.clone())]);

        let bundle2 = format!(
            r#"{{"spiffe_sequence": 2, "spiffe_refresh_hint": 2419200, "keys": [
                {{"kty": "RSA", "use": "x509-svid", "x5c": ["{}"], "n": "x", "e": "AQAB"}},
                {{"kty": "RSA", "use": "x509-svid", "x5c": ["{}"], "n": "y", "e": "AQAB"}}]}}"#,
            b64(&cert1),
            b64(&cert2)
        );
        let b = TrustBundle::parse(td(), bundle2.as_bytes()).unwrap();
        assert_eq!(b.sequence, Some(2));
        assert_eq!(b.authorities.len(), 2);
    }

    #[test]
    fn unknown_kty_and_use_are_ignored_jwt_keys_too() {
        let (_, cert) = ca_der();
        let doc = format!(
            r#"{{"keys": [
                {{"kty": "EC", "use": "jwt-svid", "kid": "k1", "crv": "P-256", "x": "a", "y": "b"}},
                {{"kty": "EC", "use": "something-new", "x5c": ["!!"]}},
                {{"kty": "PQ", "use": "x509-svid", "x5c": ["!!"]}},
                {{"use": "x509-svid", "x5c": ["!!"]}},
                {{"kty": "EC", "x5c": ["!!"]}},
                {{"kty": "EC", "use": "x509-svid", "x5c": ["{}"], "extra": true}}
            ], "unknown_top_level": 1}}"#,
            b64(&cert)
        );
        let b = TrustBundle::parse(td(), doc.as_bytes()).unwrap();
        assert_eq!(b.authorities.len(), 1);
        assert_eq!(b.sequence, None);
        assert_eq!(b.refresh_hint, None);
    }

    #[test]
    fn malformed_bundles_are_rejected_with_a_reason() {
        let (_, cert) = ca_der();
        let leaf = {
            let ca = ca::create_ca(&td(), Duration::from_secs(3600)).unwrap();
            let id = "spiffe://example.com/leaf".parse().unwrap();
            let svid = ca::issue_svid(&ca, &id, Duration::from_secs(3600)).unwrap();
            CertificateDer::from_pem_slice(svid.cert_pem.as_bytes())
                .unwrap()
                .to_vec()
        };
        let c = b64(&cert);
        let key = |x5c: &str| {
            format!(r#"{{"keys": [{{"kty": "EC", "use": "x509-svid", "x5c": {x5c}}}]}}"#)
        };
        let cases: Vec<(String, &str)> = vec![
            ("{}".into(), "no \"keys\""),
            (r#"{"keys": 3}"#.into(), "not a valid SPIFFE bundle"),
            (r#"{"keys": [1]}"#.into(), "keys[0] is not an object"),
            ("{\"keys\": [".into(), "not a valid SPIFFE bundle"),
            (key("[]"), "exactly one certificate in \"x5c\", found 0"),
            (key(&format!(r#"["{c}", "{c}"]"#)), "found 2"),
            (
                r#"{"keys": [{"kty": "EC", "use": "x509-svid"}]}"#.into(),
                "found 0",
            ),
            (key(r#"["%%%"]"#), "keys[0].x5c[0] is not base64"),
            (
                key(&format!(r#"["{}"]"#, b64(b"not a certificate"))),
                "keys[0] is not a valid X.509",
            ),
            (
                key(&format!(r#"["{}"]"#, b64(&leaf))),
                "keys[0] is not a CA",
            ),
            (
                r#"{"keys": [], "spiffe_sequence": -1}"#.into(),
                "spiffe_sequence",
            ),
            (
                r#"{"keys": [], "spiffe_sequence": "1"}"#.into(),
                "spiffe_sequence",
            ),
            (
                r#"{"keys": [], "spiffe_refresh_hint": 0}"#.into(),
                "spiffe_refresh_hint",
            ),
            (
                r#"{"keys": [], "spiffe_refresh_hint": 1.5}"#.into(),
                "spiffe_refresh_hint",
            ),
            (r#"{"keys": []}"#.into(), "no X.509 authorities"),
            (
                r#"{"keys": [{"kty": "EC", "use": "jwt-svid", "kid": "a"}]}"#.into(),
                "no X.509 authorities",
            ),
            ("".into(), "no X.509 authorities"),
            ("just text".into(), "no X.509 authorities"),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
                "private key",
            ),
            (" ".repeat(MAX_BUNDLE_BYTES + 1), "at most"),
        ];
        for (doc, want) in cases {
            let err =
                TrustBundle::parse(td(), doc.as_bytes()).expect_err(&doc[..doc.len().min(80)]);
            assert!(
                err.to_string().contains(want),
                "{doc:.80}: got {err}, want {want:?}"
            );
        }
    }

    #[test]
    fn pem_bundles_load_every_ca_and_refuse_leaves() {
        let (pem1, _) = ca_der();
        let (pem2, _) = ca_der();
        let b = TrustBundle::parse(td(), format!("{pem1}\n# comment\n{pem2}").as_bytes()).unwrap();
        assert_eq!(b.authorities.len(), 2);
        assert_eq!(b.sequence, None);
    }

    #[test]
    fn spiffe_json_round_trips() {
        let (pem, _) = ca_der();
        let b = TrustBundle::parse(td(), pem.as_bytes()).unwrap();
        let json = b.to_spiffe_json(7, Some(Duration::from_secs(300)));
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][0]["kty"], "EC");
        let again = TrustBundle::parse(td(), json.as_bytes()).unwrap();
        assert_eq!(again.authorities, b.authorities);
        assert_eq!(again.sequence, Some(7));
        assert_eq!(again.refresh_hint, Some(Duration::from_secs(300)));
        assert_eq!(
            TrustBundle::parse(td(), b.to_pem().as_bytes())
                .unwrap()
                .authorities,
            b.authorities
        );
    }
}
