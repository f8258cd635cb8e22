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
use std::time::{Duration, Instant};

use isthmus_tests::{Gateway, free_addr, solo_config};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 2_000;
/// Three times the target of 4 KiB per idle connection.
const BOUND_KIB: u64 = 3 * 4 * CONNECTIONS as u64;
const HOST: &str = "web.shop.svc.clusterset.local";

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

/// Starts the gateway under test: one thread, warnings only (no access
/// log), its outbound listener on `outbound` proxying shop/web to `origin`.
fn start_gateway(admin: SocketAddr, outbound: SocketAddr, origin: SocketAddr) -> Gateway {
    let config = solo_config(admin, outbound, &format!("\"{origin}\""), "");
    let env = [
        ("ISTHMUS__RUNTIME__THREADS", "1"),
        ("ISTHMUS__LOG__LEVEL", "warn"),
    ];
    Gateway::start(&config, admin, &env).unwrap()
}

/// `pid`'s resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
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
    let gateway = start_gateway(admin, outbound, origin);

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
    let idle = rss_kib(gateway.pid());

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
        growth = growth.min(rss_kib(gateway.pid()).saturating_sub(idle));
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
