//! SIGUSR2: starts the new process of a binary upgrade, which takes the
//! listening sockets over (see the module docs of [`crate::lifecycle`]).

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{error, info, warn};

/// Starts the new process of a binary upgrade on SIGUSR2 (see the module docs).
pub struct Upgrade {
    /// The binary this process was started from, resolved at start: after a
    /// package upgrade `/proc/self/exe` names the deleted old file.
    exe: std::io::Result<PathBuf>,
    config: PathBuf,
    upgrade_socket: PathBuf,
    /// The new process while one runs and has not exited.
    running: parking_lot::Mutex<Option<u32>>,
}

impl Upgrade {
    /// Remembers this process's binary and configuration file.
    pub fn new(config: PathBuf, upgrade_socket: PathBuf) -> Self {
        Self {
            exe: std::env::current_exe(),
            config,
            upgrade_socket,
            running: parking_lot::Mutex::new(None),
        }
    }

    pub(super) fn start(self: &Arc<Self>) {
        let exe = match &self.exe {
            Ok(exe) => exe,
            Err(e) => {
                error!(error = %e, "binary upgrade: cannot tell which binary this process runs");
                return;
            }
        };
        let mut running = self.running.lock();
        if let Some(pid) = *running {
            warn!(pid, "binary upgrade already in progress; SIGUSR2 ignored");
            return;
        }
        let mut command = std::process::Command::new(exe);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--upgrade-from")
            .arg(std::process::id().to_string())
            // Both processes must agree on the socket, whatever the file says now.
            .env("ISTHMUS__RUNTIME__UPGRADE_SOCKET", &self.upgrade_socket)
            // Without WATCHDOG_PID the watchdog applies to whichever process
            // is the main one (libsystemd's rule), so the new one feeds it.
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                error!(exe = %exe.display(), error = %e, "binary upgrade: cannot start the new process");
                return;
            }
        };
        let pid = child.id();
        info!(pid, exe = %exe.display(), "SIGUSR2 received: binary upgrade started");
        *running = Some(pid);
        let this = self.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            *this.running.lock() = None;
            match status {
                Ok(status) => error!(
                    pid, %status,
                    "binary upgrade: the new process exited; this process keeps serving"
                ),
                Err(e) => {
                    error!(pid, error = %e, "binary upgrade: cannot wait for the new process")
                }
            }
        });
    }
}
