//! `isthmus demo`: the real binary brings up its federation, every command it
//! prints succeeds, a cluster can be taken down and brought back, and Ctrl-C
//! stops everything cleanly.
//!
//! The demo uses fixed addresses (127.0.10.1, 127.0.20.1, 127.0.30.1 on the
//! standard ports and 127.0.0.1:15999), so this is the only test that runs it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use isthmus_tests::{curl_get, isthmus_bin, send_signal, wait_for};

const READY_LINE: &str = "demo ready; Ctrl-C stops it";

/// The demo process; killed (with its gateways, by SIGTERM) if the test fails.
struct Demo {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let stderr = dir.path().join("demo.stderr");
        let mut child = Command::new(isthmus_bin())
            .arg("demo")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("spawning isthmus demo")?;
        let stdout = child.stdout.take().context("demo stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child: Some(child),
            lines,
            stderr,
            _dir: dir,
        })
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Every stdout line up to and including the ready line.
    fn read_until_ready(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line == READY_LINE;
                    seen.push(line);
                    if done {
                        return Ok(seen);
                    }
                }
                Err(e) => bail!(
                    "no {READY_LINE:?} within {timeout:?} ({e}); stdout:\n{}\nstderr:\n{}",
                    seen.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("demo already reaped")?;
        let status = wait_for(timeout, "the demo to exit", || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = send_signal(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `line` with `sh -c` (at most 30 s); its exit code (None: killed) and
/// output.
fn sh(line: &str) -> Result<(Option<i32>, String, String)> {
    let dir = tempfile::tempdir()?;
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((
        code,
        std::fs::read_to_string(out).unwrap_or_default(),
        std::fs::read_to_string(err).unwrap_or_default(),
    ))
}

/// Runs `line` and checks exit 0 with output; the output.
fn run_ok(line: &str) -> Result<String> {
    let (code, out, err) = sh(line)?;
    if code != Some(0) || out.trim().is_empty() {
        bail!("`{line}` exited {code:?} with stdout {out:?}, stderr {err:?}");
    }
    Ok(out)
}

/// The pids of the demo's gateways, from the control API.
fn gateway_pids() -> Result<Vec<u32>> {
    let r = curl_get("http://127.0.0.1:15999/clusters");
    let doc: serde_json::Value =
        serde_json::from_str(&r.body).with_context(|| format!("GET /clusters: {r:?}"))?;
    Ok(doc["clusters"]
        .as_array()
        .context("clusters")?
        .iter()
        .filter_map(|c| c["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect())
}

#[test]
fn the_demo_runs_every_command_it_prints_fails_over_and_stops_cleanly() -> Result<()> {
    let started = Instant::now();
    let mut demo = Demo::start()?;
    let output = demo.read_until_ready(Duration::from_secs(90))?;
    let ready_after = started.elapsed();

    // The temporary work directory is named on the first line.
    let work: PathBuf = output
        .iter()
        .find_map(|l| {
            let rest = l.split_once(" logs in ")?.1;
            Some(PathBuf::from(rest.split(' ').next()?))
        })
        .context("the work directory is printed")?;
    assert!(work.is_dir(), "{}", work.display());

    let commands: Vec<&str> = output
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("curl ") || l.starts_with("dig "))
        .collect();
    let is_control = |l: &&str| l.contains("/clusters/") && l.contains("-X POST");
    let stop = *commands
        .iter()
        .find(|l| is_control(l) && l.ends_with("/clusters/east/stop"))
        .context("a stop command for east is printed")?;
    let start = *commands
        .iter()
        .find(|l| is_control(l) && l.ends_with("/clusters/east/start"))
        .context("a start command for east is printed")?;
    let through_vm = |svc: &str| {
        commands
            .iter()
            .find(|l| {
                l.contains(&format!("Host: {svc}.demo.svc.clusterset.local"))
                    && l.contains("127.0.30.1:15001")
            })
            .copied()
    };
    let hello_vm = through_vm("hello").context("a hello request through the VM is printed")?;
    let checkout_vm =
        through_vm("checkout").context("a checkout request through the VM is printed")?;
    assert!(
        commands.iter().any(|l| l.starts_with("dig ")),
        "{output:#?}"
    );
    assert!(
        commands.iter().filter(|l| !is_control(l)).count() >= 8,
        "{output:#?}"
    );

    // Every other command succeeds with output while everything runs.
    let mut failures = Vec::new();
    for line in commands.iter().filter(|l| !is_control(l)) {
        if let Err(e) = run_ok(line) {
            failures.push(e.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} printed command(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The canary header picks v2, which only east runs.
    let canary = commands
        .iter()
        .find(|l| l.contains("x-canary: true"))
        .context("a canary request is printed")?;
    // East has v1 and v2: only the subset the VM names keeps it on v2.
    for _ in 0..6 {
        let v2 = run_ok(canary)?;
        assert!(
            v2.contains("\"version\":\"v2\"") && v2.contains("\"cluster\":\"east\""),
            "{v2}"
        );
    }
    let before = gateway_pids()?;
    assert_eq!(before.len(), 3, "three gateways run");

    // Take east down: the VM still serves hello, and checkout from west.
    run_ok(stop)?;
    assert_ne!(
        curl_get("http://127.0.10.1:15000/healthz").status,
        200,
        "east's gateway is gone"
    );
    let hello = run_ok(hello_vm)?;
    assert!(hello.contains("\"cluster\":\"vm-edge\""), "{hello}");
    let mut last = String::new();
    let checkout = wait_for(Duration::from_secs(10), "checkout from west", || {
        match run_ok(checkout_vm) {
            Ok(out) => return Some(out),
            Err(e) => last = e.to_string(),
        }
        None
    })
    .with_context(|| last.clone())?;
    assert!(checkout.contains("\"cluster\":\"west\""), "{checkout}");
    assert_eq!(gateway_pids()?.len(), 2);

    // Bring it back; it is ready again.
    run_ok(start)?;
    wait_for(Duration::from_secs(60), "east ready again", || {
        (curl_get("http://127.0.10.1:15000/readyz").status == 200).then_some(())
    })?;
    let after = gateway_pids()?;
    assert_eq!(after.len(), 3, "three gateways run again");

    // Ctrl-C: exit 0, no gateway left, the temporary directory gone.
    send_signal(demo.pid(), "INT")?;
    let status = demo.wait_exit(Duration::from_secs(15))?;
    assert!(status.success(), "{status}; stderr:\n{}", demo.stderr());
    for pid in before.iter().chain(&after) {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "gateway process {pid} is still there"
        );
    }
    assert!(!work.exists(), "{} is left behind", work.display());
    eprintln!(
        "demo ready after {ready_after:?}, whole test {:?}",
        started.elapsed()
    );
    Ok(())
}
