//! DNS test tools: an NSD (Debian's) authoritative server on loopback to stand
//! in for an upstream resolver, and `dig`/`kdig` as clients.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{free_addr, wait_for};

/// A zone for `upstream.test.` as an upstream resolver serves it (SOA, NS and
/// `www` A 192.0.2.10), with the `extra` records appended.
pub fn upstream_zone(extra: &str) -> String {
    format!(
        "$ORIGIN upstream.test.
$TTL 300
@ IN SOA ns.upstream.test. hostmaster.upstream.test. 1 3600 600 86400 60
@ IN NS ns.upstream.test.
ns IN A 127.0.0.53
www IN A 192.0.2.10
{extra}"
    )
}

/// An NSD server on loopback serving the zones it was given.
pub struct Nsd {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nsd {
    /// Starts NSD with `zones`: (origin, zone file text) pairs, and `server`
    /// lines added to its `server:` section. Waits until it answers.
    pub fn start(zones: &[(&str, &str)], server: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let addr = free_addr();
        let d = dir.path().display();
        let mut conf = format!(
            "server:\n  ip-address: {ip}\n  port: {port}\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  database: \"\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  hide-version: yes\n{server}\nremote-control:\n  control-enable: no\n",
            ip = addr.ip(),
            port = addr.port(),
        );
        for (origin, text) in zones {
            let file = format!("{}.zone", origin.trim_end_matches('.'));
            std::fs::write(dir.path().join(&file), text)?;
            conf.push_str(&format!(
                "zone:\n  name: \"{origin}\"\n  zonefile: \"{file}\"\n"
            ));
        }
        let conf_path = dir.path().join("nsd.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(nsd_bin())
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nsd (Debian package nsd)")?;
        let nsd = Self {
            addr,
            child,
            _dir: dir,
        };
        let origin = zones.first().map_or(".", |z| z.0);
        wait_for(Duration::from_secs(10), "nsd to answer", || {
            (dig(nsd.addr, &[origin, "SOA"]).status == "NOERROR").then_some(())
        })?;
        Ok(nsd)
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nsd_bin() -> &'static str {
    if std::path::Path::new("/usr/sbin/nsd").exists() {
        "/usr/sbin/nsd"
    } else {
        "nsd"
    }
}

/// One record of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    /// Owner name, as printed (lowercase, with the trailing dot).
    pub name: String,
    /// TTL.
    pub ttl: u32,
    /// Type, e.g. `A`.
    pub rtype: String,
    /// Data, as printed.
    pub data: String,
}

/// What `dig` printed, parsed.
#[derive(Debug, Clone, Default)]
pub struct DigOutput {
    /// The response code, e.g. `NOERROR`; empty when there was no answer.
    pub status: String,
    /// Header flags, e.g. `qr aa rd`.
    pub flags: Vec<String>,
    /// The answer section.
    pub answers: Vec<Rr>,
    /// The authority section.
    pub authority: Vec<Rr>,
    /// The additional section (without the OPT pseudo-record).
    pub additional: Vec<Rr>,
    /// Everything printed, for messages.
    pub raw: String,
}

impl DigOutput {
    /// The data of the answers of type `rtype`, sorted.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .answers
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect();
        out.sort();
        out
    }

    /// Whether the header has `flag`.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Runs `dig @server -p port ARGS` (one try, 2 s timeout) and parses it.
pub fn dig(server: SocketAddr, args: &[&str]) -> DigOutput {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("dig is installed (Debian package bind9-dnsutils)");
    parse_dig(&String::from_utf8_lossy(&out.stdout))
}

/// Runs `kdig @server -p port +short ARGS`; returns its lines, sorted.
pub fn kdig_short(server: SocketAddr, args: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("kdig")
        .arg(format!("@{}", server.ip()))
        .args([
            "-p",
            &server.port().to_string(),
            "+short",
            "+retry=0",
            "+time=2",
        ])
        .args(args)
        .output()
        .context("kdig is installed (Debian package knot-dnsutils)")?;
    if !out.status.success() {
        bail!("kdig failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(str::to_owned)
        .collect();
    lines.sort();
    Ok(lines)
}

/// Runs `kdig @server -p port ARGS` (one try, 2 s timeout); returns what it
/// printed, on stdout and stderr (where it reports an error rcode), whatever
/// its exit status.
pub fn kdig(server: SocketAddr, args: &[&str]) -> Result<String> {
    let out = Command::new("kdig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+retry=0", "+time=2"])
        .args(args)
        .output()
        .context("kdig is installed (Debian package knot-dnsutils)")?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn parse_dig(text: &str) -> DigOutput {
    let mut out = DigOutput {
        raw: text.to_owned(),
        ..DigOutput::default()
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            out.status = rest.split(',').next().unwrap_or_default().to_owned();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            out.flags = rest
                .split(';')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.is_empty() || line.starts_with(';') {
            if line.is_empty() {
                section = "";
            }
        } else {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(ttl), Some(_class), Some(rtype)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rr = Rr {
                name: name.to_ascii_lowercase(),
                ttl: ttl.parse().unwrap_or(0),
                rtype: rtype.to_owned(),
                data: parts.collect::<Vec<_>>().join(" "),
            };
            match section {
                "answer" => out.answers.push(rr),
                "authority" => out.authority.push(rr),
                "additional" => out.additional.push(rr),
                _ => {}
            }
        }
    }
    out
}
