//! The demo's gateway processes and the control API that stops and starts them.

use parking_lot::Mutex;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::http::{Body, get, reply};
use super::members::{ADMIN_PORT, MEMBERS, MemberFiles, MemberSpec};

/// How long a gateway has to report ready.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a gateway has to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A member's process.
#[derive(Debug)]
enum Proc {
    Running(Child),
    /// Stopped through the control API.
    Stopped,
    /// Exited on its own, with this status.
    Exited(String),
}

/// One member and its process.
#[derive(Debug)]
pub(super) struct Member {
    /// What it is.
    pub(super) spec: &'static MemberSpec,
    /// Its files.
    pub(super) files: MemberFiles,
    proc: Mutex<Proc>,
}

/// The gateway processes of the demo.
#[derive(Debug)]
pub(super) struct Supervisor {
    bin: PathBuf,
    /// The members, in [`MEMBERS`] order.
    pub(super) members: Vec<Member>,
    /// Set once the demo stops: exits are expected from then on.
    stopping: AtomicBool,
}

impl Supervisor {
    /// Nothing started yet; `bin` is the `isthmus` binary to run.
    pub(super) fn new(bin: PathBuf, files: Vec<MemberFiles>) -> Self {
        let members = MEMBERS
            .iter()
            .zip(files)
            .map(|(spec, files)| Member {
                spec,
                files,
                proc: Mutex::new(Proc::Stopped),
            })
            .collect();
        Self {
            bin,
            members,
            stopping: AtomicBool::new(false),
        }
    }

    /// The member called `name` (gateway or cluster name).
    pub(super) fn member(&self, name: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.spec.name == name || m.spec.cluster == name)
    }

    /// Starts `member`'s gateway unless it runs; its output goes to its log.
    pub(super) fn spawn(&self, member: &Member) -> Result<u32, String> {
        let mut proc = member.proc.lock();
        if let Proc::Running(child) = &*proc {
            return Ok(child.id());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.files.log)
            .map_err(|e| format!("{}: {e}", member.files.log.display()))?;
        let err_log = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", member.files.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&member.files.config)
            .current_dir(&member.files.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // Not systemd's children, and no overrides meant for another gateway.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ISTHMUS__") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let pid = child.id();
        *proc = Proc::Running(child);
        Ok(pid)
    }

    /// Kills `member`'s gateway at once (SIGKILL), as a dead cluster would be.
    pub(super) fn kill(&self, member: &Member) {
        let mut proc = member.proc.lock();
        if let Proc::Running(child) = &mut *proc {
            let _ = child.kill();
            let _ = child.wait();
        }
        *proc = Proc::Stopped;
    }

    /// The pid of `member`'s gateway, when it runs.
    pub(super) fn pid(&self, member: &Member) -> Option<u32> {
        match &*member.proc.lock() {
            Proc::Running(child) => Some(child.id()),
            _ => None,
        }
    }

    /// Notices gateways that exited by themselves; returns a message for each.
    pub(super) fn reap(&self) -> Vec<String> {
        let mut exits = Vec::new();
        for member in &self.members {
            let mut proc = member.proc.lock();
            if let Proc::Running(child) = &mut *proc
                && let Ok(Some(status)) = child.try_wait()
            {
                *proc = Proc::Exited(status.to_string());
                if !self.stopping.load(Ordering::SeqCst) {
                    exits.push(format!(
                        "isthmus demo: the gateway of {} exited ({status}); log: {}\n{}",
                        member.spec.name,
                        member.files.log.display(),
                        log_tail(member, 15)
                    ));
                }
            }
        }
        exits
    }

    /// Waits until `member` answers `/readyz` with 200.
    pub(super) async fn wait_ready(
        &self,
        member: &Member,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let admin = member.spec.addr(ADMIN_PORT);
        loop {
            {
                let mut proc = member.proc.lock();
                match &mut *proc {
                    Proc::Running(child) => {
                        if let Ok(Some(status)) = child.try_wait() {
                            *proc = Proc::Exited(status.to_string());
                            return Err(format!("its gateway exited ({status})"));
                        }
                    }
                    Proc::Stopped => return Err("it was stopped".into()),
                    Proc::Exited(status) => return Err(format!("its gateway exited ({status})")),
                }
            }
            if let Ok((200, _)) = get(admin, "/readyz").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "http://{admin}/readyz did not answer 200 within {}s",
                    timeout.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every gateway: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    pub(super) async fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for member in &self.members {
            if let Some(pid) = self.pid(member)
                && let Ok(pid) = i32::try_from(pid)
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let _ = self.reap();
            let running = self.members.iter().any(|m| self.pid(m).is_some());
            if !running {
                return;
            }
            if Instant::now() >= deadline {
                for member in &self.members {
                    self.kill(member);
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /clusters`: each member and its state.
    pub(super) fn state_json(&self) -> serde_json::Value {
        let clusters: Vec<serde_json::Value> =
            self.members.iter().map(|m| self.member_json(m)).collect();
        serde_json::json!({ "clusters": clusters })
    }

    fn member_json(&self, member: &Member) -> serde_json::Value {
        let (state, pid, status) = match &*member.proc.lock() {
            Proc::Running(child) => ("running", Some(child.id()), None),
            Proc::Stopped => ("stopped", None, None),
            Proc::Exited(status) => ("exited", None, Some(status.clone())),
        };
        let spec = member.spec;
        serde_json::json!({
            "name": spec.name,
            "cluster": spec.cluster,
            "kind": spec.kind,
            "trust_domain": spec.trust_domain,
            "spiffe_id": spec.spiffe_id(),
            "region": spec.region,
            "zone": spec.zone,
            "admin": spec.addr(ADMIN_PORT).to_string(),
            "state": state,
            "pid": pid,
            "exit_status": status,
            "config": member.files.config.display().to_string(),
            "log": member.files.log.display().to_string(),
        })
    }
}

/// The last `lines` lines of `member`'s log.
pub(super) fn log_tail(member: &Member, lines: usize) -> String {
    let text = std::fs::read_to_string(&member.files.log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The control API: `GET /clusters`, `POST /clusters/<name>/stop|start`.
pub(super) async fn control(sup: Arc<Supervisor>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["clusters"]) => reply(StatusCode::OK, sup.state_json().to_string()),
        (&Method::POST, ["clusters", name, action @ ("stop" | "start")]) => {
            let Some(member) = sup.member(name) else {
                return reply(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({ "error": format!("no cluster {name:?}") }).to_string(),
                );
            };
            if *action == "stop" {
                sup.kill(member);
                return reply(StatusCode::OK, sup.member_json(member).to_string());
            }
            if let Err(e) = sup.spawn(member) {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": e }).to_string(),
                );
            }
            match sup.wait_ready(member, READY_TIMEOUT).await {
                Ok(()) => reply(StatusCode::OK, sup.member_json(member).to_string()),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({
                        "error": format!("{} is not ready: {e}", member.spec.name),
                        "log_tail": log_tail(member, 15),
                    })
                    .to_string(),
                ),
            }
        }
        (_, ["clusters", ..]) => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "GET /clusters, POST /clusters/<name>/stop or /start" })
                .to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "GET /clusters, POST /clusters/<name>/stop or /start" })
                .to_string(),
        ),
    }
}
