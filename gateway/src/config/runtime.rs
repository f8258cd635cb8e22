//! `[runtime]`: worker threads and the binary-upgrade socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::parse::{Check, in_range, parse_path};

/// Where a new process waits for the listening sockets during a binary upgrade
/// (`RuntimeDirectory=isthmus` in the systemd unit).
pub const DEFAULT_UPGRADE_SOCKET: &str = "/run/isthmus/upgrade.sock";
/// Upper bound for `runtime.threads`.
pub const MAX_THREADS: i64 = 1024;

/// `[runtime]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// `runtime.threads`
    pub threads: Option<i64>,
    /// `runtime.upgrade_socket`
    pub upgrade_socket: Option<String>,
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    /// Worker threads for each traffic-carrying service.
    pub threads: usize,
    /// The Unix socket over which a running gateway hands its listening
    /// sockets to the new process of a binary upgrade.
    pub upgrade_socket: PathBuf,
}

/// Checks `[runtime]`.
pub(super) fn runtime(check: &mut Check, raw: &RawRuntime) -> Option<RuntimeConfig> {
    let threads = match raw.threads {
        None => std::thread::available_parallelism().map_or(1, usize::from),
        Some(n) => check.parsed("runtime.threads", in_range(n, 1, MAX_THREADS))? as usize,
    };
    let upgrade_socket = check.or_default(
        "runtime.upgrade_socket",
        raw.upgrade_socket.as_deref(),
        DEFAULT_UPGRADE_SOCKET,
        parse_path,
    )?;
    Some(RuntimeConfig {
        threads,
        upgrade_socket,
    })
}
