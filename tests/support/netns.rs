//! Private network namespaces for tests that change packet filtering.
//!
//! [`run_isolated`] re-executes the current test binary, running only the
//! named test, inside a fresh network namespace with nothing but a loopback
//! interface; the re-executed test finds [`inside`] true and runs its body
//! there. Everything it starts (gateways, upstreams, clients) then lives on
//! that namespace's loopback, and [`Partition`] may install nftables rules
//! that never touch the host's. Needs root, `ip` (iproute2) and `nft`.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Set (to the namespace's name) in the environment of a re-executed test.
pub const INSIDE_ENV: &str = "ISTHMUS_TEST_NETNS";

/// Longest run of a re-executed test before it is killed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether this process is a test re-executed inside its private namespace.
pub fn inside() -> bool {
    std::env::var_os(INSIDE_ENV).is_some()
}

/// Makes sure `ip` and `nft` exist, installing iproute2 and nftables with
/// apt-get when one is missing (CI runs as root).
pub fn require_tools() -> Result<()> {
    let missing: Vec<&str> = [("ip", "iproute2"), ("nft", "nftables")]
        .into_iter()
        .filter(|(tool, _)| !has_command(tool))
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {missing:?} for network namespace tests");
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {missing:?} failed; run `make deps`");
    }
    Ok(())
}

fn has_command(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `body` inside a private network namespace.
///
/// Called in the outer test process, it creates namespace
/// `isthmus-<tag>-<pid>[-n]`, brings its loopback up, runs this test binary
/// again in it (`<exe> <test_name> --exact --nocapture` with [`INSIDE_ENV`]
/// set and `ISTHMUS_BIN` pointing at the already-built binary), prints the
/// inner run's output, deletes the namespace (also when the inner run fails)
/// and panics when the inner run failed. Called in the re-executed process,
/// it just runs `body`.
pub fn run_isolated(tag: &str, test_name: &str, body: impl FnOnce()) {
    if inside() {
        body();
        return;
    }
    if let Err(e) = reexec(tag, test_name) {
        panic!("{test_name} in a private network namespace: {e:#}");
    }
}

fn reexec(tag: &str, test_name: &str) -> Result<()> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    require_tools()?;
    // Resolved here: inside `ip netns exec`, /proc/self/exe is `ip`.
    let exe = std::env::current_exe().context("the test binary's path")?;
    let bin = crate::isthmus_bin().to_owned();
    let name = match SEQ.fetch_add(1, Ordering::Relaxed) {
        0 => format!("isthmus-{tag}-{}", std::process::id()),
        n => format!("isthmus-{tag}-{}-{n}", std::process::id()),
    };
    let ns = Netns::create(&name)?;
    ns.exec(&["ip", "link", "set", "lo", "up"])?;
    let log_dir = tempfile::tempdir()?;
    let log_path = log_dir.path().join("inner.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(&exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads", "1"])
        .env(INSIDE_ENV, &name)
        .env("ISTHMUS_BIN", &bin)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning the test inside the namespace")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    eprintln!("----- {test_name} inside network namespace {name} -----\n{output}-----");
    drop(ns);
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => bail!("the inner run failed ({s}); its output is above"),
        None => bail!("the inner run took longer than {CHILD_TIMEOUT:?} and was killed"),
    }
}

/// A network namespace this process created; deleted on drop, after ending
/// any process still running in it (all of them started by this test).
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Self> {
        let out = Command::new("ip").args(["netns", "add", name]).output()?;
        if !out.status.success() {
            bail!(
                "ip netns add {name} failed (root needed): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    fn exec(&self, argv: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Leftovers of an inner run that was killed: its gateways.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An nftables table that silently drops TCP to and from some local ports,
/// in both the input and the output hook: SYNs and packets of established
/// connections vanish, nothing is refused or reset. Only usable [`inside`] a
/// private namespace. Removed by [`Partition::heal`] or on drop.
pub struct Partition {
    table: String,
    healed: bool,
}

impl Partition {
    /// Installs table `inet <table>` dropping TCP with source or
    /// destination port in `ports`.
    pub fn drop_tcp_ports(table: &str, ports: &[u16]) -> Result<Self> {
        if !inside() {
            bail!("refusing to change packet filtering outside a private network namespace");
        }
        let set: Vec<String> = ports.iter().map(u16::to_string).collect();
        let set = set.join(", ");
        let rules = format!(
            "table inet {table} {{\n\
             \tchain input {{ type filter hook input priority 0; policy accept; tcp dport {{ {set} }} drop; tcp sport {{ {set} }} drop; }}\n\
             \tchain output {{ type filter hook output priority 0; policy accept; tcp dport {{ {set} }} drop; tcp sport {{ {set} }} drop; }}\n\
             }}\n"
        );
        nft(&["-f", "-"], Some(&rules))?;
        Ok(Self {
            table: table.to_owned(),
            healed: false,
        })
    }

    /// The ruleset as `nft list table` prints it.
    pub fn listing(&self) -> Result<String> {
        nft(&["list", "table", "inet", &self.table], None)
    }

    /// Deletes the table: packets flow again.
    pub fn heal(&mut self) -> Result<()> {
        if !self.healed {
            nft(&["delete", "table", "inet", &self.table], None)?;
            self.healed = true;
        }
        Ok(())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = self.heal();
    }
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    let mut input = child.stdin.take().context("nft stdin")?;
    input.write_all(stdin.unwrap_or("").as_bytes())?;
    drop(input);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a TCP connect to `addr` does within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Connected.
    Open,
    /// Refused or reset at once (nothing listens).
    Refused,
    /// No answer at all: blackholed.
    Silent,
}

/// Tries one TCP connect to `addr`.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Reach {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => Reach::Open,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Reach::Silent,
        Err(_) => Reach::Refused,
    }
}
