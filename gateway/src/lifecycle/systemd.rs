//! systemd notification: `READY=1`, `RELOADING=1`, `STOPPING=1`, `MAINPID` and
//! the watchdog, sent only when systemd supervises the process.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

/// Sends `states` to systemd when it supervises us (`NOTIFY_SOCKET` set).
pub fn notify_systemd(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

pub(super) fn monotonic_now() -> NotifyState<'static> {
    NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0))
}

/// The watchdog timeout systemd asks for, as libsystemd's `sd_watchdog_enabled`
/// reads it: `WATCHDOG_USEC` set and `WATCHDOG_PID` either absent or our pid.
/// (The sd-notify crate insists on `WATCHDOG_PID` being present.)
pub fn watchdog_timeout(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    match pid {
        Some(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_follows_libsystemd_rules() {
        let me = std::process::id().to_string();
        assert_eq!(watchdog_timeout(None, None), None);
        assert_eq!(watchdog_timeout(Some("0"), None), None);
        assert_eq!(watchdog_timeout(Some("x"), None), None);
        assert_eq!(
            watchdog_timeout(Some("2000000"), None),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_timeout(Some("2000000"), Some(&me)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_timeout(Some("2000000"), Some("1")), None);
    }
}
