//! Process lifecycle: signals, hot reload, graceful drain, binary upgrade and
//! systemd notification.
//!
//! - **SIGHUP** re-reads the configuration file. An invalid file is rejected with
//!   every problem logged and counted; the running configuration stays.
//! - **SIGTERM / SIGINT** stop gracefully: `STOPPING=1`, readiness turns false,
//!   Pingora closes the listeners (idle keep-alive connections close, HTTP/2
//!   gets GOAWAY), then in-flight requests and TCP streams get up to
//!   `shutdown.drain_timeout` before the process exits. A second SIGTERM or
//!   SIGINT cuts the drain short.
//! - **SIGUSR2** starts a binary upgrade: the binary this process was started
//!   from (by then perhaps replaced by a package upgrade) is run with
//!   `--upgrade-from <our pid>`. The new process checks its configuration, then
//!   sends us SIGQUIT and waits for the listening sockets.
//! - **SIGQUIT** hands the listening sockets to that new process (Pingora's
//!   upgrade): both accept for Pingora's 5 s overlap, then this process closes
//!   its listeners and drains as on SIGTERM. It sends no `STOPPING=1`: under
//!   systemd the new process has announced itself as the main PID.
//! - `READY=1` is sent once every readiness condition holds; `WATCHDOG=1` pings run
//!   at half of `WATCHDOG_USEC` when systemd asks for them, until the process
//!   exits.
//!
//! Signals are handled here rather than by Pingora's default watcher because
//! Pingora knows neither SIGHUP nor draining on in-flight work; and the drain
//! exits the process itself because Pingora's grace period is a fixed sleep.
//!
//! One file per concern: `signals.rs` (the watcher), `reload.rs` (SIGHUP),
//! `upgrade.rs` (SIGUSR2's new process), `readiness.rs` (start-up probes,
//! `READY=1` and the watchdog) and `systemd.rs` (notification). The listening
//! sockets made by hand live in [`crate::net`].

mod readiness;
mod reload;
mod signals;
mod systemd;
mod upgrade;

use tracing::info;

pub use readiness::{Probe, Startup, probe_address};
pub use reload::{ReloadResult, Reloader};
pub use signals::Signals;
pub use systemd::{notify_systemd, watchdog_timeout};
pub use upgrade::Upgrade;

/// The last line a stopping gateway logs; writes it and every line still
/// buffered, as the process exits next.
pub fn log_stopped() {
    info!("isthmus stopped");
    crate::logging::flush();
}
