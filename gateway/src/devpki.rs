//! `isthmus ca init` and `isthmus ca issue`: development PKI in one line each.
//!
//! `init` writes a trust domain CA (`ca.crt`, `ca.key`) and its bundle in both
//! formats (`bundle.pem`, `bundle.json`); `issue` writes an X509-SVID (`svid.crt`,
//! `svid.key`) signed by such a CA. Keys are written mode 0600, always through a
//! fresh file renamed into place. Existing files are never overwritten without
//! `--force`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_federation::trust::TrustBundle;
use isthmus_federation::trust::ca::{self, CaMaterial};
use isthmus_federation::{SpiffeId, TrustDomain};

/// File names inside a CA directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA's private key.
pub const CA_KEY: &str = "ca.key";
/// The trust bundle as PEM (the CA certificate).
pub const BUNDLE_PEM: &str = "bundle.pem";
/// The trust bundle in the SPIFFE format.
pub const BUNDLE_JSON: &str = "bundle.json";
/// An issued SVID's certificate.
pub const SVID_CERT: &str = "svid.crt";
/// An issued SVID's key.
pub const SVID_KEY: &str = "svid.key";

/// Why a `ca` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DevPkiError {
    /// A file exists and `--force` was not given.
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// The CA directory holds something unusable.
    #[error("{0}")]
    InvalidCa(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevPkiError + '_ {
    move |source| DevPkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Mode of private keys.
const SECRET_MODE: u32 = 0o600;
/// Mode of certificates and bundles (before the umask).
const PUBLIC_MODE: u32 = 0o644;

/// Writes `files` into `dir` (created if needed), refusing to overwrite unless
/// `force`. All files are checked before any is written.
///
/// Each file is written to a fresh temporary file in `dir`, created with its
/// final mode (0600 for secrets), synced, then renamed over the target: a key
/// is never readable by others for a moment, whatever mode an old file had
/// (`--force` over a 0644 key leaves a 0600 one), and a reader never sees half a
/// file.
fn write_files(
    dir: &Path,
    files: &[(&str, &str, bool)],
    force: bool,
) -> Result<Vec<PathBuf>, DevPkiError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let paths: Vec<PathBuf> = files.iter().map(|(name, ..)| dir.join(name)).collect();
    if !force && let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err(DevPkiError::Exists(existing.clone()));
    }
    for (path, (name, contents, secret)) in paths.iter().zip(files) {
        let mode = if *secret { SECRET_MODE } else { PUBLIC_MODE };
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(dir)
            .map_err(io(dir))?;
        tmp.write_all(contents.as_bytes()).map_err(io(path))?;
        tmp.as_file().sync_all().map_err(io(path))?;
        let persisted = if force {
            tmp.persist(path)
        } else {
            // Someone may have created it since the check above.
            tmp.persist_noclobber(path)
        };
        persisted.map_err(|e| match e.error.kind() {
            std::io::ErrorKind::AlreadyExists => DevPkiError::Exists(path.clone()),
            _ => DevPkiError::Io {
                path: path.clone(),
                source: e.error,
            },
        })?;
    }
    Ok(paths)
}

/// `isthmus ca init`.
pub fn init(
    td: &TrustDomain,
    out: &Path,
    validity: Duration,
    force: bool,
) -> Result<Vec<PathBuf>, DevPkiError> {
    let ca = ca::create_ca(td, validity)?;
    let bundle = TrustBundle::parse(td.clone(), ca.cert_pem.as_bytes())
        .map_err(|e| DevPkiError::InvalidCa(format!("generated CA is not a valid bundle: {e}")))?;
    let json = bundle
        .to_spiffe_json(1, None)
        .map_err(|e| DevPkiError::InvalidCa(format!("generated CA: {e}")))?;
    write_files(
        out,
        &[
            (CA_CERT, &ca.cert_pem, false),
            (CA_KEY, &ca.key_pem, true),
            (BUNDLE_PEM, &ca.cert_pem, false),
            (BUNDLE_JSON, &json, false),
        ],
        force,
    )
}

/// `isthmus ca issue`.
pub fn issue(
    ca_dir: &Path,
    id: &SpiffeId,
    out: &Path,
    validity: Duration,
    force: bool,
) -> Result<Vec<PathBuf>, DevPkiError> {
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).map_err(io(&path))
    };
    let ca = CaMaterial {
        cert_pem: read(CA_CERT)?,
        key_pem: read(CA_KEY)?,
    };
    // The CA must belong to the ID's trust domain, or the SVID could never verify.
    let bundle = TrustBundle::parse(id.trust_domain(), ca.cert_pem.as_bytes())
        .map_err(|e| DevPkiError::InvalidCa(format!("{}: {e}", ca_dir.join(CA_CERT).display())))?;
    let ca_uri = isthmus_federation::trust::CertInfo::parse(&bundle.authorities[0])
        .map(|i| i.uri_sans)
        .unwrap_or_default();
    if let Some(uri) = ca_uri.first()
        && uri.trim_end_matches('/') != format!("spiffe://{}", id.trust_domain_str())
    {
        return Err(DevPkiError::InvalidCa(format!(
            "the CA in {} is for {uri}, not for {}",
            ca_dir.display(),
            id.trust_domain()
        )));
    }
    let svid = ca::issue_svid(&ca, id, validity)?;
    write_files(
        out,
        &[
            (SVID_CERT, &svid.cert_pem, false),
            (SVID_KEY, &svid.key_pem, true),
        ],
        force,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_federation::trust::Svid;
    use isthmus_federation::trust::tls::crypto_provider;

    /// A dev CA for `dev.example` initialised in `ca/` of a new temporary
    /// directory (which lives as long as the first of the three).
    fn initialised_ca() -> (tempfile::TempDir, TrustDomain, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let td: TrustDomain = "dev.example".parse().unwrap();
        let ca_dir = dir.path().join("ca");
        init(&td, &ca_dir, ca::DEFAULT_CA_VALIDITY, false).unwrap();
        (dir, td, ca_dir)
    }

    #[test]
    fn init_then_issue_makes_a_usable_svid() {
        let (dir, td, ca_dir) = initialised_ca();
        let mode = std::fs::metadata(ca_dir.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Both bundle formats describe the same CA.
        let pem = TrustBundle::parse(td.clone(), &std::fs::read(ca_dir.join(BUNDLE_PEM)).unwrap())
            .unwrap();
        let json = TrustBundle::parse(
            td.clone(),
            &std::fs::read(ca_dir.join(BUNDLE_JSON)).unwrap(),
        )
        .unwrap();
        assert_eq!(pem.authorities, json.authorities);

        let id: SpiffeId = "spiffe://dev.example/isthmus/gateway/gw".parse().unwrap();
        let out = dir.path().join("gw");
        issue(&ca_dir, &id, &out, ca::DEFAULT_SVID_VALIDITY, false).unwrap();
        let svid = Svid::from_pem(
            &std::fs::read(out.join(SVID_CERT)).unwrap(),
            &std::fs::read(out.join(SVID_KEY)).unwrap(),
            Some(&id),
            &crypto_provider(),
        )
        .unwrap();
        assert_eq!(svid.spiffe_id, id);

        // No silent overwrites; --force overwrites.
        assert!(matches!(
            init(&td, &ca_dir, ca::DEFAULT_CA_VALIDITY, false),
            Err(DevPkiError::Exists(_))
        ));
        init(&td, &ca_dir, ca::DEFAULT_CA_VALIDITY, true).unwrap();
        // A CA of another trust domain cannot issue for this one.
        let other: SpiffeId = "spiffe://other.example/x".parse().unwrap();
        let err = issue(&ca_dir, &other, &out, ca::DEFAULT_SVID_VALIDITY, true).unwrap_err();
        assert!(err.to_string().contains("not for other.example"), "{err}");
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn force_replaces_keys_with_0600_files_whatever_the_old_mode() {
        let (dir, td, ca_dir) = initialised_ca();
        let key = ca_dir.join(CA_KEY);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let old = std::fs::read(&key).unwrap();
        init(&td, &ca_dir, ca::DEFAULT_CA_VALIDITY, true).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_ne!(std::fs::read(&key).unwrap(), old, "a new key was written");

        let id: SpiffeId = "spiffe://dev.example/isthmus/gateway/gw".parse().unwrap();
        let out = dir.path().join("gw");
        issue(&ca_dir, &id, &out, ca::DEFAULT_SVID_VALIDITY, false).unwrap();
        std::fs::set_permissions(out.join(SVID_KEY), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        issue(&ca_dir, &id, &out, ca::DEFAULT_SVID_VALIDITY, true).unwrap();
        assert_eq!(mode(&out.join(SVID_KEY)), 0o600);
        // Certificates stay readable, and no temporary file is left behind.
        assert_eq!(mode(&out.join(SVID_CERT)) & 0o600, 0o600);
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
