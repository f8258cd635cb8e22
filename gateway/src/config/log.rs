//! `[log]`: the log filter and how lines are written.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::parse::{Check, Keyword, keyword};

/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// `[log]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `log.level`
    pub level: Option<String>,
    /// `log.format`
    pub format: Option<String>,
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

impl Keyword for LogFormat {
    const KIND: &'static str = "format";
    const WORDS: &'static [(&'static str, Self)] = &[
        ("auto", Self::Auto),
        ("json", Self::Json),
        ("text", Self::Text),
    ];
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        keyword(s)
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

/// Checks `[log]`.
pub(super) fn log(check: &mut Check, raw: &RawLog) -> Option<LogConfig> {
    let level = check.or_default(
        "log.level",
        raw.level.as_deref(),
        DEFAULT_LOG_LEVEL,
        parse_log_filter,
    );
    let format = check.or_value(
        "log.format",
        raw.format.as_deref(),
        LogFormat::Auto,
        LogFormat::from_str,
    );
    Some(LogConfig {
        level: level?,
        format: format?,
    })
}

/// A `tracing` filter, kept as written (the logger builds it).
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
