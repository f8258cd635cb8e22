//! `[log]`: the log filter and how lines are written.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::parse::{Check, Keyword, keyword};

/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// The share of successful requests the access log keeps by default: all.
pub const DEFAULT_ACCESS_SAMPLE_PPM: u32 = PPM;

/// Parts per million: `log.access_sample` is kept in millionths.
pub const PPM: u32 = 1_000_000;

/// `[log]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `log.level`
    pub level: Option<String>,
    /// `log.format`
    pub format: Option<String>,
    /// `log.access_sample`
    pub access_sample: Option<f64>,
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
    /// The share of successful requests the access log keeps, in millionths
    /// ([`PPM`] keeps all); failed ones are always kept. Shown as the ratio it
    /// was written as.
    #[serde(rename = "access_sample", serialize_with = "as_ratio")]
    pub access_sample_ppm: u32,
}

fn as_ratio<S: serde::Serializer>(ppm: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(f64::from(*ppm) / f64::from(PPM))
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
    let access_sample = match raw.access_sample {
        None => Some(DEFAULT_ACCESS_SAMPLE_PPM),
        Some(r) if (0.0..=1.0).contains(&r) => Some((r * f64::from(PPM)).round() as u32),
        Some(r) => {
            check.fail(
                "log.access_sample",
                format!(
                    "{r} is out of range; expected a ratio from 0.0 (log failed requests only) to 1.0 (log every request)"
                ),
            );
            None
        }
    };
    Some(LogConfig {
        level: level?,
        format: format?,
        access_sample_ppm: access_sample?,
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
