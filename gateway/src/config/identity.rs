//! `[identity]`: this gateway's X509-SVID and its trust domain's bundle, by
//! file path only (the configuration never holds key material).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::parse::{Check, parse_path, resolve_path};

/// `[identity]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    /// `identity.cert`
    pub cert: Option<String>,
    /// `identity.key`
    pub key: Option<String>,
    /// `identity.bundle`
    pub bundle: Option<String>,
}

/// `[identity]`: file paths, never key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityConfig {
    /// X509-SVID certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// This trust domain's bundle, PEM or SPIFFE JSON.
    pub bundle: PathBuf,
}

impl IdentityConfig {
    /// Makes its file paths absolute, relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve_path(base, &mut self.cert);
        resolve_path(base, &mut self.key);
        resolve_path(base, &mut self.bundle);
    }
}

/// Checks `[identity]`.
pub(super) fn identity(check: &mut Check, raw: &RawIdentity) -> Option<IdentityConfig> {
    let cert = check.required("identity.cert", raw.cert.as_deref(), parse_path);
    let key = check.required("identity.key", raw.key.as_deref(), parse_path);
    let bundle = check.required("identity.bundle", raw.bundle.as_deref(), parse_path);
    Some(IdentityConfig {
        cert: cert?,
        key: key?,
        bundle: bundle?,
    })
}
