//! Stage two: the validated, typed configuration the gateway runs on.
//!
//! [`Config::from_raw`] checks every field of a [`RawConfig`], collects every problem
//! with its dotted path, and only returns a [`Config`] when there is none. Defaults
//! are the named constants below; the shipped `config/isthmus.toml` documents them.

use std::fmt::Display;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use isthmus_federation::{ClusterName, GatewayName, Locality, LocalityError, TrustDomain};
use serde::Serialize;

use super::error::{ConfigError, ConfigErrors};
use super::raw::{RawAdmin, RawConfig, RawGateway, RawLocality, RawLog, RawRuntime, RawShutdown};

/// Default admin listener: loopback only, so metrics and debug data stay on the host.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";
/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default longest wait for in-flight requests after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for `shutdown.drain_timeout`: systemd's default stop timeout is 90 s.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Upper bound for `runtime.threads`.
pub const MAX_THREADS: i64 = 1024;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Who this gateway is.
    pub gateway: GatewayIdentity,
    /// The admin HTTP API.
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// Worker threads.
    pub runtime: RuntimeConfig,
    /// Draining on stop.
    pub shutdown: ShutdownConfig,
}

/// `[gateway]`: the identity of this gateway in the federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayIdentity {
    /// Gateway name, the last segment of its SPIFFE ID.
    pub name: GatewayName,
    /// The cluster (or VM fleet) this gateway fronts.
    pub cluster: ClusterName,
    /// The SPIFFE trust domain of this cluster.
    pub trust_domain: TrustDomain,
    /// Where this gateway runs.
    pub locality: Locality,
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener.
    pub listen: SocketAddr,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald under systemd, text on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "json" => Ok(Self::Json),
            "text" => Ok(Self::Text),
            other => Err(format!(
                "unknown format {other:?}; expected \"auto\", \"json\" or \"text\""
            )),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `info,isthmus_gateway=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    /// Worker threads for each traffic-carrying service.
    pub threads: usize,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShutdownConfig {
    /// Longest wait for in-flight requests to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// Collects problems while fields are checked one by one.
#[derive(Default)]
struct Check {
    errors: Vec<ConfigError>,
}

impl Check {
    /// Parses a required field; records an error when it is missing or invalid.
    fn required<T, E: Display>(
        &mut self,
        path: &str,
        value: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        match value {
            None => {
                self.errors.push(ConfigError::new(path, "is required"));
                None
            }
            Some(v) => self.parsed(path, parse(v)),
        }
    }

    /// Parses an optional field, falling back to `default` when absent.
    fn or_default<T, E: Display>(
        &mut self,
        path: &str,
        value: Option<&str>,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        self.parsed(path, parse(value.unwrap_or(default)))
    }

    fn parsed<T, E: Display>(&mut self, path: &str, result: Result<T, E>) -> Option<T> {
        result
            .map_err(|e| self.errors.push(ConfigError::new(path, e)))
            .ok()
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not an address such as \"127.0.0.1:15000\" or \"[::]:15000\"")
    })
}

fn parse_duration(s: &str, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as \"10s\" or \"1m 30s\" ({e})"))?;
    if d > max {
        return Err(format!(
            "{s:?} is longer than the maximum of {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| {
            format!(
                "{s:?} is not a log filter such as \"info\" or \"warn,isthmus_gateway=debug\" ({e})"
            )
        })
}

impl Config {
    /// Validates a raw configuration, returning every problem found.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigErrors> {
        let mut check = Check::default();
        let gateway = gateway(&mut check, &raw.gateway);
        let admin = admin(&mut check, &raw.admin);
        let log = log(&mut check, &raw.log);
        let runtime = runtime(&mut check, &raw.runtime);
        let shutdown = shutdown(&mut check, &raw.shutdown);
        match (gateway, admin, log, runtime, shutdown) {
            (Some(gateway), Some(admin), Some(log), Some(runtime), Some(shutdown))
                if check.errors.is_empty() =>
            {
                Ok(Self {
                    gateway,
                    admin,
                    log,
                    runtime,
                    shutdown,
                })
            }
            _ => Err(ConfigErrors(check.errors)),
        }
    }

    /// The SPIFFE ID this gateway presents: `spiffe://<td>/isthmus/gateway/<name>`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/isthmus/gateway/{}",
            self.gateway.trust_domain, self.gateway.name
        )
    }
}

fn gateway(check: &mut Check, raw: &RawGateway) -> Option<GatewayIdentity> {
    let name = check.required("gateway.name", raw.name.as_deref(), GatewayName::from_str);
    let cluster = check.required(
        "gateway.cluster",
        raw.cluster.as_deref(),
        ClusterName::from_str,
    );
    let trust_domain = check.required(
        "gateway.trust_domain",
        raw.trust_domain.as_deref(),
        TrustDomain::from_str,
    );
    let locality = locality(check, &raw.locality);
    Some(GatewayIdentity {
        name: name?,
        cluster: cluster?,
        trust_domain: trust_domain?,
        locality: locality?,
    })
}

fn locality(check: &mut Check, raw: &RawLocality) -> Option<Locality> {
    let Some(region) = raw.region.as_deref() else {
        check
            .errors
            .push(ConfigError::new("gateway.locality.region", "is required"));
        return None;
    };
    let result = Locality::new(region, raw.zone.as_deref(), raw.subzone.as_deref());
    result
        .map_err(|e| {
            let error = match e {
                LocalityError::Part { part, source } => {
                    ConfigError::new(format!("gateway.locality.{part}"), source)
                }
                LocalityError::MissingParent { part, .. } => {
                    ConfigError::new(format!("gateway.locality.{part}"), e)
                }
                LocalityError::TooManyParts => ConfigError::new("gateway.locality", e),
            };
            check.errors.push(error);
        })
        .ok()
}

fn admin(check: &mut Check, raw: &RawAdmin) -> Option<AdminConfig> {
    let listen = check.or_default(
        "admin.listen",
        raw.listen.as_deref(),
        DEFAULT_ADMIN_LISTEN,
        parse_socket_addr,
    )?;
    Some(AdminConfig { listen })
}

fn log(check: &mut Check, raw: &RawLog) -> Option<LogConfig> {
    let level = check.or_default(
        "log.level",
        raw.level.as_deref(),
        DEFAULT_LOG_LEVEL,
        parse_log_filter,
    );
    let format = check.or_default(
        "log.format",
        raw.format.as_deref(),
        "auto",
        LogFormat::from_str,
    );
    Some(LogConfig {
        level: level?,
        format: format?,
    })
}

fn runtime(check: &mut Check, raw: &RawRuntime) -> Option<RuntimeConfig> {
    let threads = match raw.threads {
        None => std::thread::available_parallelism().map_or(1, usize::from),
        Some(n) if (1..=MAX_THREADS).contains(&n) => n as usize,
        Some(n) => {
            check.errors.push(ConfigError::new(
                "runtime.threads",
                format!("{n} is out of range; expected 1 to {MAX_THREADS}"),
            ));
            return None;
        }
    };
    Some(RuntimeConfig { threads })
}

fn shutdown(check: &mut Check, raw: &RawShutdown) -> Option<ShutdownConfig> {
    let drain_timeout = match raw.drain_timeout.as_deref() {
        None => DEFAULT_DRAIN_TIMEOUT,
        Some(s) => check.parsed(
            "shutdown.drain_timeout",
            parse_duration(s, MAX_DRAIN_TIMEOUT),
        )?,
    };
    Some(ShutdownConfig { drain_timeout })
}
