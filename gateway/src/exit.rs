//! How the `isthmus` binary ends: its exit codes, and the typed errors that
//! stop `isthmus run` at start-up, each mapped to its code here and nowhere
//! else.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tracing::error;

use crate::config::ConfigErrors;
use crate::logging::LoggingError;

/// The exit codes of `isthmus`, an external contract (scripts, systemd units
/// and the packages rely on them). They follow sysexits(3):
///
/// | code | variant | when |
/// | ---: | --- | --- |
/// | 0 | [`Exit::Success`] | the command did its work; `run` stopped on SIGTERM / SIGINT |
/// | 1 | [`Exit::Failure`] | a failure at run time: a port in use, a TLS or metrics set-up error, a refused binary upgrade, a failed `ca` or `probe` |
/// | 64 | [`Exit::Usage`] | the command line cannot be parsed (EX_USAGE) |
/// | 78 | [`Exit::Config`] | the configuration, or a certificate, key or bundle file it names, is invalid (EX_CONFIG) |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// 0: done.
    Success = 0,
    /// 1: any failure that is not the command line's or the configuration's.
    Failure = 1,
    /// 64 (EX_USAGE): a command line that cannot be parsed.
    Usage = 64,
    /// 78 (EX_CONFIG): an invalid configuration.
    Config = 78,
}

impl Exit {
    /// The process exit status.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// Why `isthmus run` could not start. Everything is checked before the old
/// process of an upgrade is told to hand over, so any of these leaves a
/// running gateway serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration, or a file it names, is invalid: every problem, with
    /// its path.
    #[error("{} has {} problem(s)", path.display(), errors.0.len())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// Every problem found.
        errors: ConfigErrors,
    },
    /// Logging cannot be set up (e.g. no journald socket).
    #[error(transparent)]
    Logging(#[from] LoggingError),
    /// The client configuration of a TLS readiness probe cannot be built.
    #[error("cannot build the TLS readiness probe: {0}")]
    ReadinessProbe(#[source] rustls::Error),
    /// A listen address is taken or not on this host.
    #[error("{listener}: cannot listen on {addr}: {source}")]
    Listen {
        /// The listener's configuration path, e.g. `admin.listen`.
        listener: String,
        /// The address it is configured with.
        addr: SocketAddr,
        /// Why it cannot be bound.
        source: std::io::Error,
    },
    /// The federation's metrics cannot be registered.
    #[error("cannot register the federation metrics: {0}")]
    FederationMetrics(#[source] prometheus::Error),
    /// The discovery sources' metrics cannot be registered.
    #[error("cannot register the discovery metrics: {0}")]
    DiscoveryMetrics(#[source] prometheus::Error),
    /// The DNS server cannot be set up.
    #[error("cannot set up DNS: {0}")]
    Dns(String),
    /// A data-plane listener cannot be set up.
    #[error("cannot set up the data plane: {0}")]
    DataPlane(String),
    /// The bundle endpoint's TLS listener cannot be configured.
    #[error("cannot configure the bundle endpoint's TLS: {0}")]
    BundleEndpoint(#[source] Box<pingora_error::Error>),
    /// The old process of a binary upgrade cannot be taken over from.
    #[error("binary upgrade: {message}; the running gateway keeps serving")]
    Upgrade {
        /// The old process.
        old_pid: u32,
        /// What went wrong.
        message: String,
    },
}

impl StartError {
    /// The exit code this error ends the process with.
    pub fn exit(&self) -> Exit {
        match self {
            StartError::Config { .. } => Exit::Config,
            StartError::Logging(_)
            | StartError::ReadinessProbe(_)
            | StartError::Listen { .. }
            | StartError::FederationMetrics(_)
            | StartError::DiscoveryMetrics(_)
            | StartError::Dns(_)
            | StartError::DataPlane(_)
            | StartError::BundleEndpoint(_)
            | StartError::Upgrade { .. } => Exit::Failure,
        }
    }

    /// Reports the error where the operator looks: on stderr while logging is
    /// not set up yet (an invalid configuration, logging itself), in the log
    /// otherwise; then returns the exit code.
    pub fn report(&self) -> ExitCode {
        match self {
            StartError::Config { path, errors } => print_config_errors(path, errors),
            StartError::Logging(e) => eprintln!("isthmus: {e}"),
            StartError::ReadinessProbe(e) => {
                error!(error = %e, "cannot build the TLS readiness probe");
            }
            StartError::Listen {
                listener,
                addr,
                source,
            } => error!(%addr, error = %source, "{listener}: cannot listen on {addr}: {source}"),
            StartError::FederationMetrics(e) => {
                error!(error = %e, "cannot register the federation metrics");
            }
            StartError::DiscoveryMetrics(e) => {
                error!(error = %e, "cannot register the discovery metrics");
            }
            StartError::Dns(e) => error!(error = %e, "cannot set up DNS"),
            StartError::DataPlane(e) => error!(error = %e, "cannot set up the data plane"),
            StartError::BundleEndpoint(e) => {
                error!(error = %e, "cannot configure the bundle endpoint's TLS");
            }
            StartError::Upgrade { old_pid, message } => error!(
                old_pid,
                "binary upgrade: {message}; the running gateway keeps serving"
            ),
        }
        self.exit().into()
    }
}

/// Prints each problem as `dotted.path: what is wrong`, one per line, on stderr.
pub fn print_config_errors(path: &Path, errors: &ConfigErrors) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "isthmus: {} has {} problem{}:",
        path.display(),
        errors.0.len(),
        if errors.0.len() == 1 { "" } else { "s" }
    );
    for e in &errors.0 {
        let _ = writeln!(err, "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_sysexits() {
        assert_eq!(Exit::Success.code(), 0);
        assert_eq!(Exit::Failure.code(), 1);
        assert_eq!(Exit::Usage.code(), 64);
        assert_eq!(Exit::Config.code(), 78);
    }

    #[test]
    fn only_configuration_errors_exit_78() {
        let config = StartError::Config {
            path: "isthmus.toml".into(),
            errors: ConfigErrors(Vec::new()),
        };
        assert_eq!(config.exit(), Exit::Config);
        let listen = StartError::Listen {
            listener: "admin.listen".into(),
            addr: "127.0.0.1:15000".parse().unwrap(),
            source: std::io::ErrorKind::AddrInUse.into(),
        };
        assert_eq!(listen.exit(), Exit::Failure);
        assert_eq!(
            listen.to_string(),
            "admin.listen: cannot listen on 127.0.0.1:15000: address in use"
        );
        let upgrade = StartError::Upgrade {
            old_pid: 1,
            message: "cannot signal process 1".into(),
        };
        assert_eq!(upgrade.exit(), Exit::Failure);
    }
}
