//! Test support for Isthmus end-to-end tests: locating (and building) the real
//! `isthmus` binary, free loopback ports, and a [`Gateway`] harness that runs the
//! binary with a generated configuration and talks to it with real clients.
//!
//! Synchronisation is by polling an observable condition (a port answering, a log
//! line appearing) with a deadline, never by fixed sleeps.
#![forbid(unsafe_code)]

pub mod dns;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod rogue;
pub mod two_clusters;

use parking_lot::Mutex;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The `isthmus` binary under test: `$ISTHMUS_BIN` when set (e.g. an installed
/// package), otherwise the workspace's debug build, built once per test process
/// so it is never stale.
pub fn isthmus_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("ISTHMUS_BIN") {
            return PathBuf::from(bin);
        }
        let target_dir = target_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "isthmus-gateway",
                "--bin",
                "isthmus",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(workspace_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the isthmus binary failed");
        target_dir.join("debug/isthmus")
    })
}

/// Where this run's binaries are: the directory two levels above
/// `ISTHMUS_BIN` when that is set (`make test` points it at the instrumented
/// build `cargo llvm-cov` made, so that the gateways the tests start count
/// towards coverage too), else `CARGO_TARGET_DIR` or the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    if let Some(bin) = std::env::var_os("ISTHMUS_BIN")
        && let Some(dir) = Path::new(&bin).parent().and_then(Path::parent)
    {
        return dir.to_owned();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A loopback address with a port that was free a moment ago, and not handed
/// out before in this process. Collisions with parallel tests (other
/// processes) are unlikely; a test that loses the race fails loudly at bind.
pub fn free_addr() -> SocketAddr {
    // The kernel may hand a just-released port out again at once; never give
    // one test process the same port twice.
    static GIVEN: OnceLock<Mutex<std::collections::HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Mutex::default);
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
        let addr = l.local_addr().expect("local address");
        let mut given = given.lock();
        if given.insert(addr.port()) {
            return addr;
        }
    }
}

/// Runs `isthmus ARGS` to completion.
pub fn isthmus(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(isthmus_bin());
    cmd.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("isthmus runs")
}

/// Writes `config` to `dir/check.toml` and runs `isthmus check-config` on it:
/// its exit code and standard error.
pub fn check_config(dir: &Path, config: &str) -> (Option<i32>, String) {
    let file = dir.join("check.toml");
    std::fs::write(&file, config).expect("the configuration is written");
    let path = file.to_str().expect("a UTF-8 path");
    let out = isthmus(&["check-config", "--config", path], &[]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` every few milliseconds until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// An HTTP response as curl saw it.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code (0 when the connection failed).
    pub status: u16,
    /// Body as text.
    pub body: String,
}

/// The `served_by` field of an [`EchoServer`]'s JSON answer in `r` (empty
/// when the body is not one).
pub fn served_by(r: &HttpResponse) -> String {
    serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["served_by"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The backends `/debug/upstreams` of `gw` lists for `service` (`ns/name`).
pub fn upstream_backends(gw: &Gateway, service: &str) -> Vec<serde_json::Value> {
    let doc = gw.admin_json("/debug/upstreams");
    doc["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["service"] == service)
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// `GET url` with curl; status 0 when nothing answered.
pub fn curl_get(url: &str) -> HttpResponse {
    curl(&[url])
}

/// Minimal valid configuration text for a gateway whose admin API is on `admin`.
pub fn minimal_config(name: &str, admin: SocketAddr) -> String {
    format!(
        r#"[gateway]
name = "{name}"
cluster = "test-cluster"
trust_domain = "test.example.org"

[gateway.locality]
region = "test-region"
zone = "test-zone"

[admin]
listen = "{admin}"

[log]
level = "info"
format = "json"

[runtime]
threads = 1

[shutdown]
drain_timeout = "3s"
"#
    )
}

/// An HTTP/1.1 upstream on loopback that answers every request with JSON
/// describing it: `served_by`, `method`, `path`, `headers` (lowercase names) and
/// `body_len`. Keep-alive is honoured; `Expect: 100-continue` gets a `100
/// Continue` first, and paths under `/early-hints` a `103 Early Hints`. It runs until the test process ends.
pub struct EchoServer {
    /// Its address.
    pub addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
}

/// How an [`EchoServer`] answers; changeable while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers with this status (200 normally) and the request as JSON.
    Status(u16),
    /// Waits this long, then answers 200.
    Delay(Duration),
    /// Reads the request, then closes the connection without answering.
    Close,
}

impl EchoServer {
    /// Starts an echo server that names itself `name`.
    pub fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
        let addr = listener.local_addr().expect("local address");
        let name = name.to_owned();
        let behaviour = Arc::new(Mutex::new(Behaviour::Status(200)));
        let shared = behaviour.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let name = name.clone();
                let behaviour = shared.clone();
                std::thread::spawn(move || echo_connection(conn, &name, &behaviour));
            }
        });
        Self { addr, behaviour }
    }

    /// Changes how it answers from the next request on.
    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock() = behaviour;
    }
}

fn echo_connection(conn: std::net::TcpStream, name: &str, behaviour: &Mutex<Behaviour>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut headers = serde_json::Map::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().into());
            }
        }
        let body_len: usize = headers
            .get("content-length")
            .and_then(|v| v.as_str()?.parse().ok())
            .unwrap_or(0);
        // Interim responses as origins send them: 100 Continue to a client that
        // waits for it before its body (RFC 9110 §10.1.1), and 103 Early Hints
        // on /early-hints (RFC 8297).
        if headers.get("expect").and_then(|v| v.as_str()) == Some("100-continue")
            && writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        if path.starts_with("/early-hints")
            && writer
                .write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
                .is_err()
        {
            return;
        }
        let mut body = vec![0; body_len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let status = match *behaviour.lock() {
            Behaviour::Status(status) => status,
            Behaviour::Delay(d) => {
                std::thread::sleep(d);
                200
            }
            Behaviour::Close => return,
        };
        let close = headers.get("connection").and_then(|v| v.as_str()) == Some("close");
        let doc = serde_json::json!({
            "served_by": name, "method": method, "path": path,
            "headers": headers, "body_len": body_len,
        })
        .to_string();
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{doc}",
            doc.len()
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Starts a TCP echo server on loopback; returns its address.
pub fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = listener.local_addr().expect("local address");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = conn.try_clone().expect("clone");
                let mut writer = conn;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    addr
}

/// Runs curl with `args`; returns (status code, body).
pub fn curl(args: &[&str]) -> HttpResponse {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    HttpResponse {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
    }
}

/// Development PKI made with the real `isthmus ca` commands.
pub struct DevPki {
    dir: tempfile::TempDir,
}

impl DevPki {
    /// An empty PKI directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `isthmus ca init` for `td` into `<dir>/<name>`; returns that directory.
    pub fn ca(&self, name: &str, td: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        run_ok(&[
            "ca",
            "init",
            "--trust-domain",
            td,
            "--out",
            out.to_str().expect("utf-8"),
        ]);
        out
    }

    /// `isthmus ca issue` of `spiffe_id` from `ca` into `<dir>/<name>`.
    pub fn issue(&self, ca: &Path, spiffe_id: &str, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        run_ok(&[
            "ca",
            "issue",
            "--ca",
            ca.to_str().expect("utf-8"),
            "--spiffe-id",
            spiffe_id,
            "--out",
            out.to_str().expect("utf-8"),
            "--force",
        ]);
        out
    }
}

impl Default for DevPki {
    fn default() -> Self {
        Self::new()
    }
}

fn run_ok(args: &[&str]) {
    let out = isthmus(args, &[]);
    assert!(
        out.status.success(),
        "isthmus {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces `path` the way deployment tools do: write aside, then rename.
pub fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("isthmus-test-tmp");
    std::fs::write(&tmp, contents).expect("write temporary file");
    std::fs::rename(&tmp, path).expect("rename over the target");
}

/// What an [`OpensslServer`] does with a connection.
#[derive(Clone, Copy, Debug)]
pub enum OpensslMode {
    /// `-rev`: reverses each line it receives.
    Reverse,
    /// `-www`: answers any HTTPS GET with 200.
    Www,
}

/// `openssl s_server` on a free loopback port with `tls_dir`'s certificate
/// (`svid.crt`, `svid.key`); killed on drop.
pub struct OpensslServer {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl OpensslServer {
    /// Starts it and waits until it accepts connections.
    pub fn start(tls_dir: &Path, mode: OpensslMode) -> Self {
        let addr = free_addr();
        let mode = match mode {
            OpensslMode::Reverse => "-rev",
            OpensslMode::Www => "-www",
        };
        let child = Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                mode,
                "-accept",
                &addr.to_string(),
                "-cert",
            ])
            .arg(tls_dir.join("svid.crt"))
            .arg("-key")
            .arg(tls_dir.join("svid.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl is installed");
        wait_for(
            Duration::from_secs(10),
            "openssl s_server to listen",
            || std::net::TcpStream::connect(addr).ok().map(|_| ()),
        )
        .expect("openssl s_server listens");
        Self { child, addr }
    }
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `openssl s_client` to `addr`, verifying against `ca_file`; returns its output.
pub fn openssl_s_client(addr: SocketAddr, ca_file: &Path) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-CAfile"])
        .arg(ca_file)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Python of the tools virtualenv (`target/tools`), where `make deps-test`
/// installs the pinned `PYPI_TEST_CLIENTS` (independent implementations our
/// output is checked with), ready for arguments. Panics, saying what to run,
/// when the virtualenv is missing.
pub fn python_client() -> Command {
    let python = workspace_root().join("target/tools/bin/python3");
    assert!(
        python.exists(),
        "{} is missing: `make deps-test` installs the Python test clients",
        python.display()
    );
    let mut cmd = Command::new(python);
    cmd.stdin(Stdio::null());
    cmd
}

/// Assertions that are all evaluated, then reported together: a run under
/// load shows every measurement, not just the first that missed.
#[derive(Default)]
pub struct Verdicts {
    failed: Vec<String>,
}

impl Verdicts {
    /// Logs `what` as passed or failed, and remembers a failure.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        eprintln!("[{}] {what}", if ok { " ok " } else { "FAIL" });
        if !ok {
            self.failed.push(what);
        }
    }

    /// Whether every check so far passed.
    pub fn all_passed(&self) -> bool {
        self.failed.is_empty()
    }

    /// Panics, listing them, when any check failed.
    pub fn finish(self) {
        assert!(
            self.failed.is_empty(),
            "{} check(s) failed:\n  {}",
            self.failed.len(),
            self.failed.join("\n  ")
        );
    }
}

/// The value of the Prometheus series `series` (name with labels) in `metrics`.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// The sum of every series of metric `name` in `metrics` that carries all of
/// `labels` (in any order, among others); 0 when there is none.
pub fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (set, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            labels
                .iter()
                .all(|(k, v)| {
                    set.split("\",")
                        .any(|p| p.trim_end_matches('"') == format!("{k}=\"{v}"))
                })
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .fold(0.0, |sum, v| sum + v)
}

/// What `docs/metrics.md` leaves out of the series in `metrics` (a
/// `/metrics` page): each metric needs a row whose first cell names it, and
/// that row must name each of its labels in backquotes (a histogram's
/// `_bucket`, `_sum` and `_count` series are its own, `le` aside).
pub fn undocumented_metrics(metrics: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/metrics.md"))
        .expect("docs/metrics.md is readable");
    let row = |metric: &str| {
        let name = format!("`{metric}`");
        doc.lines()
            .find(|line| {
                line.strip_prefix('|')
                    .and_then(|rest| rest.split('|').next())
                    .is_some_and(|cell| cell.split(',').any(|m| m.trim() == name))
            })
            .map(str::to_owned)
    };
    let histograms: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" histogram"))
        .collect();
    let mut missing = std::collections::BTreeSet::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..end];
        let metric = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| histograms.contains(base))
            })
            .unwrap_or(name);
        let Some(row) = row(metric) else {
            missing.insert(format!("{metric}: no row"));
            continue;
        };
        for label in label_names(&line[end..]) {
            if label != "le" && !row.contains(&format!("`{label}`")) {
                missing.insert(format!("{metric}: label `{label}`"));
            }
        }
    }
    missing.into_iter().collect()
}

/// The label names of a series' `{name="value",...}` part (values may hold
/// escaped quotes, commas and braces).
fn label_names(set: &str) -> Vec<&str> {
    let Some(mut rest) = set.strip_prefix('{') else {
        return Vec::new();
    };
    let mut names = Vec::new();
    while let Some((name, after)) = rest.split_once("=\"") {
        names.push(name.trim_start_matches(','));
        let mut escaped = false;
        let close = after
            .char_indices()
            .find(|&(_, c)| {
                let end = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                end
            })
            .map_or(after.len(), |(i, _)| i + 1);
        rest = &after[close..];
    }
    names
}

/// An exclusive lock shared by every test process on the machine, held
/// until the returned file is dropped: for tests whose measurements must not
/// compete for the CPU with each other.
pub fn machine_lock(name: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("{name}.lock"));
    let file = std::fs::File::create(&path).expect("create the lock file");
    file.lock().expect("lock the lock file");
    file
}

/// A configuration for gateway `name` (cluster `<name>-cluster`) of trust domain
/// `td` with the SVID in `tls_dir` (`svid.crt`, `svid.key`), its domain's
/// `bundle`, the admin API on `admin`, and `extra` TOML appended.
pub fn gateway_config(
    name: &str,
    td: &str,
    admin: SocketAddr,
    tls_dir: &Path,
    bundle: &Path,
    extra: &str,
) -> String {
    format!(
        r#"{head}[identity]
cert = "{cert}"
key = "{key}"
bundle = "{bundle}"
{extra}
"#,
        head = config_head(name, &format!("{name}-cluster"), td, admin, 1),
        cert = tls_dir.join("svid.crt").display(),
        key = tls_dir.join("svid.key").display(),
        bundle = bundle.display(),
    )
}

/// The tables every test gateway's configuration starts with: `[gateway]`
/// (region `test`), `[admin]` on `admin`, JSON logs and `threads` runtime
/// threads.
fn config_head(name: &str, cluster: &str, td: &str, admin: SocketAddr, threads: u8) -> String {
    format!(
        r#"[gateway]
name = "{name}"
cluster = "{cluster}"
trust_domain = "{td}"
[gateway.locality]
region = "test"
[admin]
listen = "{admin}"
[log]
format = "json"
[runtime]
threads = {threads}
"#
    )
}

/// Starts a gateway without identity whose outbound listener serves shop/web
/// (port 80) from `endpoints`; `extra` is appended to its configuration.
/// Returns it ready, with its outbound address.
pub fn solo_gateway(endpoints: &[SocketAddr], extra: &str) -> Result<(Gateway, SocketAddr)> {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    solo_gateway_with(&endpoints.join(", "), extra)
}

/// [`solo_gateway`] with shop/web's `endpoints` array written as TOML (tables
/// with labels, say); `extra` follows it, so it may go on with keys of the
/// `[[services]]` table such as `subsets`.
pub fn solo_gateway_with(endpoints: &str, extra: &str) -> Result<(Gateway, SocketAddr)> {
    let (admin, outbound) = (free_addr(), free_addr());
    let mut gw = Gateway::start(&solo_config(admin, outbound, endpoints, extra), admin, &[])?;
    gw.wait_ready(Duration::from_secs(20))?;
    Ok((gw, outbound))
}

/// The configuration of [`solo_gateway_with`]: admin API on `admin`, outbound
/// listener on `outbound`.
pub fn solo_config(
    admin: SocketAddr,
    outbound: SocketAddr,
    endpoints: &str,
    extra: &str,
) -> String {
    format!(
        r#"{head}[listeners]
outbound = "{outbound}"
[[services]]
namespace = "shop"
name = "web"
ports = [{{ port = 80 }}]
endpoints = [{endpoints}]
{extra}
"#,
        head = config_head("gw-solo", "solo", "solo.example", admin, 2),
    )
}

/// Sends `signal` (e.g. "HUP", "TERM") to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) -> Result<()> {
    // `kill 0` signals the whole process group: the test runner too.
    anyhow::ensure!(pid != 0, "no process to send SIG{signal} to");
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// A running `isthmus run` process with its own directory, config and log.
pub struct Gateway {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The admin API address.
    pub admin: SocketAddr,
}

impl Gateway {
    /// Writes `config` and starts `isthmus run` on it with `env` added.
    pub fn start(config: &str, admin: SocketAddr, env: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("isthmus.toml");
        std::fs::write(&config_path, config)?;
        Self::spawn(dir, config_path, admin, env)
    }

    /// Starts `isthmus run` on the file `config` as it is (a shipped
    /// example, say: never written to) with `env` added.
    pub fn start_file(config: &Path, admin: SocketAddr, env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn(tempfile::tempdir()?, config.to_owned(), admin, env)
    }

    fn spawn(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let log = std::fs::File::create(dir.path().join("isthmus.log"))?;
        let mut cmd = Command::new(isthmus_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawning isthmus")?;
        Ok(Self {
            child: Some(child),
            dir,
            config: config_path,
            admin,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The configuration file the gateway runs on.
    pub fn config_path(&self) -> PathBuf {
        self.config.clone()
    }

    /// Everything the gateway logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("isthmus.log")).unwrap_or_default()
    }

    /// The log as parsed JSON lines (non-JSON lines, e.g. a panic, are skipped).
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `GET path` on the admin API.
    pub fn admin_get(&self, path: &str) -> HttpResponse {
        curl_get(&format!("http://{}{path}", self.admin))
    }

    /// `GET path` on the admin API, parsed as JSON.
    pub fn admin_json(&self, path: &str) -> serde_json::Value {
        let r = self.admin_get(path);
        serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {}", r.body))
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let r = wait_for(timeout, "/readyz to answer 200", || {
            if let Some(status) = self.try_exit_status() {
                return Some(Err(anyhow::anyhow!("isthmus exited early with {status}")));
            }
            (self.admin_get("/readyz").status == 200).then_some(Ok(()))
        });
        r.and_then(|inner| inner)
            .with_context(|| format!("gateway log:\n{}", self.log()))
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        wait_for(timeout, &format!("log line containing {needle:?}"), || {
            self.log().contains(needle).then_some(())
        })
        .with_context(|| format!("gateway log:\n{}", self.log()))
    }

    /// Waits until the access log has a line for each of `request_ids` (the
    /// gateway writes INFO lines up to 100 ms late, many at a time), then
    /// returns those lines, parsed, in the order of `request_ids`.
    pub fn access_lines(&self, request_ids: &[&str]) -> Result<Vec<serde_json::Value>> {
        let found = || -> Option<Vec<serde_json::Value>> {
            let lines: Vec<serde_json::Value> = self
                .log_json()
                .into_iter()
                .filter(|l| l["target"] == "isthmus::access")
                .collect();
            request_ids
                .iter()
                .map(|id| lines.iter().find(|l| l["request_id"] == *id).cloned())
                .collect()
        };
        wait_for(Duration::from_secs(5), "the access log lines", found)
            .with_context(|| format!("request ids {request_ids:?}; gateway log:\n{}", self.log()))
    }

    /// Sends `signal` (e.g. "HUP", "TERM") with kill(1).
    pub fn signal(&self, signal: &str) -> Result<()> {
        send_signal(self.pid(), signal)
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits for the process to exit; returns its status and how long it took.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, Duration)> {
        let start = Instant::now();
        let status = wait_for(timeout, "isthmus to exit", || self.try_exit_status())
            .with_context(|| format!("gateway log:\n{}", self.log()))?;
        self.child = None;
        Ok((status, start.elapsed()))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Under `cargo llvm-cov` (`make test`) the gateway must exit by itself
        // to write its coverage profile: SIGTERM, which it answers by draining
        // (idle here) and exiting within a few seconds. Otherwise, or if it
        // does not, SIGKILL at once.
        // (`self.child` is gone once a test waited for the exit: pid 0 would
        // signal the whole process group, the test runner included.)
        let running = self.child.is_some() && self.try_exit_status().is_none();
        if measuring_coverage() && running {
            let _ = self.signal("TERM");
            let _ = wait_for(Duration::from_secs(5), "isthmus to exit", || {
                self.try_exit_status()
            });
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the processes this run starts write coverage profiles (`cargo
/// llvm-cov` sets `LLVM_PROFILE_FILE`).
pub fn measuring_coverage() -> bool {
    std::env::var_os("LLVM_PROFILE_FILE").is_some()
}

/// Starts a real gRPC server (grpc.health.v1: unary `Check`, streaming
/// `Watch`) on loopback in `rt`, reporting `service` as serving; returns its
/// address and the reporter that changes the status. It runs as long as `rt`.
pub fn grpc_health_server(
    rt: &tokio::runtime::Runtime,
    service: &str,
) -> (SocketAddr, tonic_health::server::HealthReporter) {
    let (reporter, health) = tonic_health::server::health_reporter();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the gRPC server");
    let addr = listener.local_addr().expect("local address");
    rt.block_on(reporter.set_service_status(service, tonic_health::ServingStatus::Serving));
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, reporter)
}

/// A gRPC channel to `authority` (e.g. `http://grpc.shop.svc.clusterset.local:9090`)
/// through the gateway listening at `base` (`http://host:port`): h2c to the
/// gateway, with `authority` as each request's `:authority`.
pub async fn grpc_channel_via(base: &str, authority: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(base.to_owned())
        .expect("a gateway URL")
        .origin(authority.parse().expect("an authority URI"))
        .connect()
        .await
        .expect("connect to the gateway")
}
