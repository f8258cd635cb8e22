//! `[shutdown]`: draining on stop.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Check, parse_duration};

/// Default longest wait for in-flight requests after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for `shutdown.drain_timeout`: systemd's default stop timeout is 90 s.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// `[shutdown]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    /// `shutdown.drain_timeout`
    pub drain_timeout: Option<String>,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShutdownConfig {
    /// Longest wait for in-flight requests to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// Checks `[shutdown]`.
pub(super) fn shutdown(check: &mut Check, raw: &RawShutdown) -> Option<ShutdownConfig> {
    let drain_timeout = check.or_value(
        "shutdown.drain_timeout",
        raw.drain_timeout.as_deref(),
        DEFAULT_DRAIN_TIMEOUT,
        |s| parse_duration(s, MAX_DRAIN_TIMEOUT),
    )?;
    Some(ShutdownConfig { drain_timeout })
}
