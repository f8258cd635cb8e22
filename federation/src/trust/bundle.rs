//! Trust bundles: the X.509 authorities of one trust domain, read from PEM or from
//! the SPIFFE bundle format (SPIFFE Trust Domain and Bundle §4: a JWK Set whose
//! `keys[]` with `use: "x509-svid"` carry one CA certificate each in `x5c`).
//!
//! Parsing is strict where the specification is (`keys` must be present, an
//! `x509-svid` key has exactly one `x5c` certificate, which must be a CA) and
//! lenient where it says so (unknown `kty` or `use`: the key is ignored).
//! `jwt-svid` keys are ignored too: Isthmus authenticates X509-SVIDs only.
//!
//! Each JWK we write is a complete RFC 7517/7518 public key: `kty` and the key's
//! own members (`crv`, `x`, `y` for EC; `n`, `e` for RSA; `crv`, `x` for OKP),
//! taken from the certificate's SubjectPublicKeyInfo, beside `use` and `x5c`, as
//! SPIRE and go-spiffe write them. On input those members may be absent (older
//! Isthmus wrote none; the certificate is what we use), but where present they
//! must describe the `x5c` certificate's key, or the bundle is refused: a JWK
//! that says one key and carries another is broken or forged, and go-jose (under
//! go-spiffe and SPIRE) refuses the whole bundle for it too.

use std::time::Duration;

use base64::Engine;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde::Deserialize;
use serde_json::{Map, Value};

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
    /// A certificate whose public key has no JWK form (RFC 7518 §6), so it
    /// could not be published in a SPIFFE bundle.
    #[error("{what} has a public key that cannot be written as a JWK: {reason}")]
    NoJwkForm {
        /// Which certificate, e.g. `keys[2]` or `certificate 1`.
        what: String,
        /// What kind of key it is.
        reason: String,
    },
    /// An `x509-svid` key whose JWK members describe another key than its
    /// `x5c` certificate's.
    #[error("keys[{index}]: {reason}")]
    KeyMismatch {
        /// Index in `keys`.
        index: usize,
        /// Which member disagrees, and how.
        reason: String,
    },
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
            // §4.2.1/§4.2.2: unknown key types and uses are ignored, whole;
            // so are `jwt-svid` keys, which Isthmus has no use for.
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
            let params = check_authority(&format!("keys[{index}]"), &der)?;
            check_key_members(index, key, &params)?;
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
    /// and `refresh_hint` as given: one JWK per authority with `use`, the key's
    /// members (`kty`, `crv`, `x`, `y` / `n`, `e`) and the certificate in `x5c`,
    /// and no `kid` (X509-SVID §6.1). Fails only for an authority whose key has
    /// no JWK form, which no parsed bundle holds.
    pub fn to_spiffe_json(
        &self,
        sequence: u64,
        refresh_hint: Option<Duration>,
    ) -> Result<String, BundleError> {
        let keys = self
            .authorities
            .iter()
            .enumerate()
            .map(|(i, der)| {
                let mut key = Map::new();
                key.insert("use".into(), "x509-svid".into());
                key.extend(
                    jwk_public_key(der).map_err(|reason| BundleError::NoJwkForm {
                        what: format!("certificate {}", i + 1),
                        reason,
                    })?,
                );
                key.insert(
                    "x5c".into(),
                    Value::from(vec![base64::engine::general_purpose::STANDARD.encode(der)]),
                );
                Ok(Value::Object(key))
            })
            .collect::<Result<Vec<_>, BundleError>>()?;
        let mut doc = serde_json::json!({ "keys": keys, "spiffe_sequence": sequence });
        if let Some(hint) = refresh_hint {
            doc["spiffe_refresh_hint"] = Value::from(hint.as_secs().max(1));
        }
        Ok(doc.to_string())
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

/// Checks that `der` can serve as an authority, and returns its public key as
/// JWK members: every authority must be publishable in a SPIFFE bundle.
fn check_authority(what: &str, der: &[u8]) -> Result<Map<String, Value>, BundleError> {
    let info = CertInfo::parse(der).map_err(|source| BundleError::Cert {
        what: what.to_owned(),
        source,
    })?;
    if !info.is_ca {
        return Err(BundleError::NotCa(what.to_owned()));
    }
    jwk_public_key(der).map_err(|reason| BundleError::NoJwkForm {
        what: what.to_owned(),
        reason,
    })
}

fn b64url(bytes: &[u8]) -> Value {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(bytes)
        .into()
}

/// The public key of certificate `der` as the JWK members RFC 7518 §6 defines
/// for it: `kty` with `crv`, `x`, `y` (EC: each coordinate at the curve's full
/// size), `n`, `e` (RSA: without leading zeros) or `crv`, `x` (OKP, RFC 8037).
fn jwk_public_key(der: &[u8]) -> Result<Map<String, Value>, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::public_key::PublicKey;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    let algorithm = spki.algorithm.algorithm.to_id_string();
    let key = spki.subject_public_key.data.as_ref();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|oid| oid.to_id_string());
    let mut jwk = Map::new();
    match algorithm.as_str() {
        // rsaEncryption, RSASSA-PSS
        "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => {
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err("an RSA key that does not parse".into());
            };
            jwk.insert("kty".into(), "RSA".into());
            jwk.insert("n".into(), b64url(unsigned(rsa.modulus)));
            jwk.insert("e".into(), b64url(unsigned(rsa.exponent)));
        }
        // id-ecPublicKey with a named curve
        "1.2.840.10045.2.1" => {
            let (crv, size) = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256", 32),
                Some("1.3.132.0.34") => ("P-384", 48),
                Some("1.3.132.0.35") => ("P-521", 66),
                other => {
                    return Err(format!(
                        "an EC key on curve {}, which JWK does not name (P-256, P-384, P-521)",
                        other.unwrap_or("(none given)")
                    ));
                }
            };
            // SEC 1 uncompressed point: 0x04 || x || y.
            let [4, xy @ ..] = key else {
                return Err(format!("an {crv} key that is not an uncompressed point"));
            };
            if xy.len() != 2 * size {
                return Err(format!("an {crv} point of {} bytes", key.len()));
            }
            let (x, y) = xy.split_at(size);
            jwk.insert("kty".into(), "EC".into());
            jwk.insert("crv".into(), crv.into());
            jwk.insert("x".into(), b64url(x));
            jwk.insert("y".into(), b64url(y));
        }
        "1.3.101.112" | "1.3.101.113" => {
            let (crv, size) = if algorithm == "1.3.101.112" {
                ("Ed25519", 32)
            } else {
                ("Ed448", 57)
            };
            if key.len() != size {
                return Err(format!("an {crv} key of {} bytes", key.len()));
            }
            jwk.insert("kty".into(), "OKP".into());
            jwk.insert("crv".into(), crv.into());
            jwk.insert("x".into(), b64url(key));
        }
        other => {
            return Err(format!(
                "algorithm {other} (JWK has RSA, EC P-256/P-384/P-521, Ed25519, Ed448)"
            ));
        }
    }
    Ok(jwk)
}

/// A DER INTEGER's magnitude without its leading zero bytes.
fn unsigned(int: &[u8]) -> &[u8] {
    let zeros = int.iter().take_while(|b| **b == 0).count();
    &int[zeros..]
}

/// Checks the key members of `keys[index]` against `params`, the members of its
/// `x5c` certificate's key. A JWK without any of them passes (the certificate
/// carries the key; older Isthmus wrote none); one with some must have all of
/// them, each equal to the certificate's. Values are compared decoded: trailing
/// `=` padding and, for RSA, leading zero octets make no difference.
fn check_key_members(
    index: usize,
    key: &Map<String, Value>,
    params: &Map<String, Value>,
) -> Result<(), BundleError> {
    let mismatch = |reason: String| Err(BundleError::KeyMismatch { index, reason });
    let kty = params["kty"].as_str().unwrap_or_default();
    if key.get("kty") != Some(&params["kty"]) {
        return mismatch(format!(
            "\"kty\" is {} but the x5c certificate has an {kty} key",
            key.get("kty").unwrap_or(&Value::Null)
        ));
    }
    let members: Vec<&String> = params.keys().filter(|k| *k != "kty").collect();
    if !members.iter().any(|m| key.contains_key(*m)) {
        return Ok(());
    }
    let decode = |v: &Value| {
        let text = v.as_str()?.trim_end_matches('=');
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()
    };
    for member in members {
        let want = &params[member];
        let agree = match (member.as_str(), key.get(member)) {
            (_, None) => {
                return mismatch(format!(
                    "\"{member}\" is missing beside the other members of its {kty} key"
                ));
            }
            ("crv", Some(got)) => got == want,
            ("n" | "e", Some(got)) => {
                decode(got).is_some_and(|got| unsigned(&got) == decode(want).unwrap_or_default())
            }
            (_, Some(got)) => decode(got) == decode(want),
        };
        if !agree {
            return mismatch(format!(
                "\"{member}\" does not match the public key of its x5c certificate"
            ));
        }
    }
    Ok(())
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

    fn b64url(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A CA of `td()` with `key`, DER.
    fn ca_with(key: &rcgen::KeyPair) -> Vec<u8> {
        let ca = ca::create_ca_with_key(&td(), Duration::from_secs(3600), key).unwrap();
        CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    /// An RSA key made by openssl (ring makes none), and the modulus openssl
    /// prints for it: an account of the key that owes nothing to our code.
    fn openssl_rsa() -> (rcgen::KeyPair, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rsa.pem");
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .arg(&path)
                .output()
                .expect("openssl runs");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ]);
        let modulus = openssl(&["rsa", "-noout", "-modulus", "-in"]);
        let hex = modulus.trim().strip_prefix("Modulus=").unwrap();
        let n = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let pem = std::fs::read_to_string(&path).unwrap();
        let key = rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap();
        (key, n)
    }

    /// `x` and `y` of an EC key, base64url, from the SEC 1 point rcgen holds.
    fn ec_xy(key: &rcgen::KeyPair) -> (String, String) {
        let point = key.public_key_raw();
        assert_eq!(point[0], 4, "uncompressed");
        let (x, y) = point[1..].split_at(point.len() / 2);
        (b64url(x), b64url(y))
    }

    /// A bundle as SPIRE serves it (its bundleutil marshalling, member for
    /// member): X.509 roots of each key type SPIRE offers (`ca_key_type`
    /// ec-p256, ec-p384, rsa-2048) with `crv`/`x`/`y` or `n`/`e` beside `x5c`;
    /// JWT-SVID keys with `kid` and no `x5c`; `spiffe_sequence` and
    /// `spiffe_refresh_hint`. Made with fresh certificates at each run, so it
    /// never expires. Also a key of a future `use`, one of an unknown `kty`,
    /// and members nobody defined, which must all be ignored.
    #[test]
    fn a_bundle_as_spire_serves_it_is_accepted() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let (rsa, n) = openssl_rsa();
        let jwt_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let roots = [ca_with(&p256), ca_with(&p384), ca_with(&rsa)];
        let ((x256, y256), (x384, y384), (jwt_x, jwt_y)) =
            (ec_xy(&p256), ec_xy(&p384), ec_xy(&jwt_key));
        let doc = serde_json::json!({
            "keys": [
                {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": x256, "y": y256,
                 "x5c": [b64(&roots[0])]},
                {"use": "jwt-svid", "kid": "C6vs25welZOx6WksNYfbMfiw9l96pMnD", "kty": "EC",
                 "crv": "P-256", "x": jwt_x, "y": jwt_y},
                {"use": "x509-svid", "kty": "EC", "crv": "P-384", "x": x384, "y": y384,
                 "x5c": [b64(&roots[1])]},
                {"use": "x509-svid", "kty": "RSA", "n": b64url(&n), "e": "AQAB",
                 "x5c": [b64(&roots[2])]},
                {"use": "jwt-svid", "kid": "rsa-jwt", "kty": "RSA", "n": b64url(&n), "e": "AQAB"},
                {"use": "wit-svid", "kty": "EC", "crv": "P-256", "x": jwt_x, "y": jwt_y},
                {"use": "x509-svid", "kty": "ML-DSA", "x5c": ["not base64!"]},
            ],
            "spiffe_sequence": 12,
            "spiffe_refresh_hint": 300,
            "spire_extension": {"anything": true},
        });
        let b = TrustBundle::parse(td(), doc.to_string().as_bytes()).unwrap();
        let want: Vec<CertificateDer<'_>> = roots.into_iter().map(CertificateDer::from).collect();
        assert_eq!(b.authorities, want, "the three X.509 roots, in order");
        assert_eq!(b.sequence, Some(12));
        assert_eq!(b.refresh_hint, Some(Duration::from_secs(300)));
        // ...and we publish them again with the same members.
        let ours: Value = serde_json::from_str(
            &b.to_spiffe_json(12, Some(Duration::from_secs(300)))
                .unwrap(),
        )
        .unwrap();
        let x509_keys: Vec<&Value> = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["use"] == "x509-svid" && k["kty"] != "ML-DSA")
            .collect();
        assert_eq!(
            ours["keys"].as_array().unwrap().iter().collect::<Vec<_>>(),
            x509_keys
        );
    }

    /// The shape of the specification's Appendix A, trust bundle #1 and #2
    /// (RSA roots, with their real `n` and `e`).
    #[test]
    fn spec_appendix_a_bundles() {
        let (rsa1, n1) = openssl_rsa();
        let (rsa2, n2) = openssl_rsa();
        let (cert1, cert2) = (ca_with(&rsa1), ca_with(&rsa2));
        let key = |cert: &[u8], n: &[u8]| {
            format!(
                r#"{{"kty": "RSA", "use": "x509-svid", "x5c": ["{}"], "n": "{}", "e": "AQAB"}}"#,
                b64(cert),
                b64url(n)
            )
        };
        let bundle1 = format!(
            r#"{{"spiffe_sequence": 1, "spiffe_refresh_hint": 2419200, "keys": [{}]}}"#,
            key(&cert1, &n1)
        );
        let b = TrustBundle::parse(td(), bundle1.as_bytes()).unwrap();
        assert_eq!(b.sequence, Some(1));
        assert_eq!(b.refresh_hint, Some(Duration::from_secs(2_419_200)));
        assert_eq!(b.authorities, vec![CertificateDer::from(cert1.clone())]);

        let bundle2 = format!(
            r#"{{"spiffe_sequence": 2, "spiffe_refresh_hint": 2419200, "keys": [{}, {}]}}"#,
            key(&cert1, &n1),
            key(&cert2, &n2)
        );
        let b = TrustBundle::parse(td(), bundle2.as_bytes()).unwrap();
        assert_eq!(b.sequence, Some(2));
        assert_eq!(b.authorities.len(), 2);
    }

    /// A JWK that names one key and carries another is refused, bundle and all
    /// (as go-jose, under go-spiffe and SPIRE, refuses it): the previous bundle
    /// stays in use. A JWK with no key members at all (older Isthmus) passes:
    /// the certificate is what we use.
    #[test]
    fn x509_svid_keys_whose_members_disagree_with_their_certificate_are_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = b64(&ca_with(&key));
        let ((x, y), (other_x, other_y)) = (ec_xy(&key), ec_xy(&other));
        let parse = |members: &str| {
            let doc =
                format!(r#"{{"keys": [{{"use": "x509-svid", "x5c": ["{cert}"], {members}}}]}}"#);
            TrustBundle::parse(td(), doc.as_bytes())
        };
        let good = format!(r#""kty": "EC", "crv": "P-256", "x": "{x}", "y": "{y}""#);
        assert!(parse(&good).is_ok());
        assert!(parse(r#""kty": "EC""#).is_ok(), "no members: the x5c's key");
        let padded = format!(r#""kty": "EC", "crv": "P-256", "x": "{x}=", "y": "{y}=""#);
        assert!(parse(&padded).is_ok(), "base64url padding is tolerated");
        let cases = [
            (good.replace(&x, &other_x), r#""x" does not match"#),
            (good.replace(&y, &other_y), r#""y" does not match"#),
            (good.replace("P-256", "P-384"), r#""crv" does not match"#),
            (good.replace(&x, "!!"), r#""x" does not match"#),
            (
                good.replace(r#""kty": "EC""#, r#""kty": "RSA""#),
                "has an EC key",
            ),
            (
                format!(r#""kty": "EC", "crv": "P-256", "x": "{x}""#),
                r#""y" is missing"#,
            ),
            (r#""kty": "EC", "crv": "P-256""#.into(), r#""x" is missing"#),
        ];
        for (members, want) in cases {
            let err = parse(&members).expect_err(&members).to_string();
            assert!(
                err.contains("keys[0]: ") && err.contains(want),
                "{members}: {err}"
            );
        }
    }

    /// A CA whose key has no JWK form (here an openssl brainpool key) could
    /// never be published in a SPIFFE bundle, nor verify anything for rustls:
    /// it is refused where the bundle is loaded, with the reason.
    #[test]
    fn authorities_without_a_jwk_form_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("ca.pem");
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:brainpoolP256r1", "-nodes", "-keyout"])
            .arg(dir.path().join("ca.key"))
            .args(["-subj", "/CN=brainpool", "-days", "1"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE", "-out"])
            .arg(&cert)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "{out:?}");
        let err = TrustBundle::parse(td(), &std::fs::read(&cert).unwrap()).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "certificate 1 has a public key that cannot be written as a JWK: \
                 an EC key on curve 1.3.36.3.3.2.8.1.1.7"
            ),
            "{err}"
        );
    }

    /// Each JWK we write is the certificate's key per RFC 7518 §6, checked
    /// against values that owe nothing to our SPKI parsing: rcgen's SEC 1
    /// point for EC keys and openssl's modulus for RSA.
    #[test]
    fn written_jwks_carry_their_certificate_key() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let (rsa, n) = openssl_rsa();
        let roots = [ca_with(&p256), ca_with(&p384), ca_with(&rsa)];
        let pem: String = roots.iter().map(|der| pem_certificate(der)).collect();
        let b = TrustBundle::parse(td(), pem.as_bytes()).unwrap();
        let doc: Value = serde_json::from_str(&b.to_spiffe_json(3, None).unwrap()).unwrap();
        let keys = doc["keys"].as_array().unwrap();
        let x509 = |i: usize, members: Value| {
            let mut want = serde_json::json!({"use": "x509-svid"});
            want.as_object_mut()
                .unwrap()
                .extend(members.as_object().unwrap().clone());
            want["x5c"] = serde_json::json!([b64(&roots[i])]);
            want
        };
        let ((x256, y256), (x384, y384)) = (ec_xy(&p256), ec_xy(&p384));
        assert_eq!(
            keys[0],
            x509(
                0,
                serde_json::json!({"kty": "EC", "crv": "P-256", "x": x256, "y": y256})
            )
        );
        assert_eq!(
            keys[1],
            x509(
                1,
                serde_json::json!({"kty": "EC", "crv": "P-384", "x": x384, "y": y384})
            )
        );
        assert_eq!(
            keys[2],
            x509(
                2,
                serde_json::json!({"kty": "RSA", "n": b64url(&n), "e": "AQAB"})
            )
        );
        assert_eq!(keys.len(), 3);
        assert_eq!(doc["spiffe_sequence"], 3);
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
        let json = b.to_spiffe_json(7, Some(Duration::from_secs(300))).unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][0]["kty"], "EC");
        assert_eq!(v["keys"][0]["crv"], "P-256");
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
