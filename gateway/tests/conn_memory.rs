//! Memory per idle connection: the real `isthmus` binary holds 2,000 idle
//! HTTP/1.1 keep-alive connections on its outbound listener (each made one
//! request through it to a local origin) for a few KiB each, and keeps
//! answering new requests meanwhile.
//!
//! The bound is three times the target of 4 KiB per connection (24 MiB for
//! 2,000), generous enough for debug and coverage builds; before the idle
//! connection's buffers were released (Pingora's 64 KiB read buffer, the
//! session and its request future) 2,000 connections took about 90 MiB.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test reports failure

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 2_000;
/// Three times the target of 4 KiB per idle connection.
const BOUND_KIB: u64 = 3 * 4 * CONNECTIONS as u64;
const HOST: &str = "web.shop.svc.clusterset.local";

/// The gateway under test: `$ISTHMUS_BIN` when set (the instrumented build
/// under coverage), else the one Cargo built for this package's tests.
fn isthmus_bin() -> PathBuf {
    std::env::var_os("ISTHMUS_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_isthmus")),
        PathBuf::from,
    )
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (the gateway
/// inherits it); fails the test when that is too low for the connections.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let need = 2 * CONNECTIONS as u64 + 500;
    assert!(
        hard >= need,
        "RLIMIT_NOFILE hard limit {hard} is below the {need} this test needs"
    );
}

struct Gateway {
    child: Child,
    dir: tempfile::TempDir,
}

impl Gateway {
    fn start(admin: SocketAddr, outbound: SocketAddr, origin: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"[gateway]
name = "gw-mem"
cluster = "mem"
trust_domain = "mem.example"
[gateway.locality]
region = "test"
[admin]
listen = "{admin}"
[log]
format = "json"
level = "warn"
[runtime]
threads = 1
[listeners]
outbound = "{outbound}"
[[services]]
namespace = "shop"
name = "web"
ports = [{{ port = 80 }}]
endpoints = ["{origin}"]
"#
        );
        let path = dir.path().join("isthmus.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("isthmus.log")).unwrap();
        let child = Command::new(isthmus_bin())
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning isthmus");
        Self { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("isthmus.log")).unwrap_or_default()
    }

    /// The gateway's resident set, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Under coverage the gateway writes its profile when it exits by itself.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An origin answering every request on a kept-alive connection with `ok`.
async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match stream.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.get_mut().write_all(reply).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr
}

/// Sends one GET on `stream` and reads the response; returns its status.
async fn get(stream: &mut TcpStream) -> std::io::Result<u16> {
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(status)
}

/// A new connection, one request: the gateway answers 200.
async fn answers(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        get(&mut stream).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(30), attempt).await,
        Ok(Ok(200))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_cost_a_few_kib_each() {
    raise_nofile();
    let origin = origin().await;
    let (admin, outbound) = (free_addr(), free_addr());
    let gateway = Gateway::start(admin, outbound, origin);

    // Ready once it proxies; a few requests warm it up (pools, metrics).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers(outbound).await {
        assert!(
            Instant::now() < deadline,
            "the gateway never answered:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..20 {
        assert!(answers(outbound).await);
    }
    let idle = gateway.rss_kib();

    // 2,000 connections, each with one request answered, then left open; a
    // few at a time, so the gateway's upstream connections stay few.
    let mut open = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS / 50 {
        let batch = (0..50).map(|_| async move {
            let mut stream = TcpStream::connect(outbound).await.unwrap();
            let status = get(&mut stream).await.unwrap();
            assert_eq!(status, 200);
            stream
        });
        open.extend(futures::future::join_all(batch).await);
    }
    assert_eq!(open.len(), CONNECTIONS);

    // Still answering while they are open.
    for _ in 0..10 {
        assert!(answers(outbound).await, "{}", gateway.log());
    }

    // The lowest reading over a few seconds: the last connections' requests
    // may still be winding down when the first reading is taken.
    let mut growth = u64::MAX;
    for _ in 0..20 {
        growth = growth.min(gateway.rss_kib().saturating_sub(idle));
        if growth < BOUND_KIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "{CONNECTIONS} idle connections: RSS {idle} KiB before, +{growth} KiB ({:.2} KiB each)",
        growth as f64 / CONNECTIONS as f64
    );
    assert!(
        growth < BOUND_KIB,
        "{CONNECTIONS} idle connections grew the gateway's RSS by {growth} KiB \
         ({:.1} KiB each), over {BOUND_KIB} KiB",
        growth as f64 / CONNECTIONS as f64
    );

    // The connections were really kept: each still carries a request.
    for stream in open.iter_mut().step_by(100) {
        assert_eq!(get(stream).await.unwrap(), 200);
    }
    drop(open);
    assert!(answers(outbound).await);
}
