//! `isthmus demo`: a self-contained federation on loopback, with no setup.
//!
//! This process is a supervisor. It makes a work directory (a temporary one
//! unless `--work-dir` is given), a development CA per trust domain and a
//! gateway SVID each, starts the demo services (small HTTP servers in this
//! process), writes one gateway configuration per member and runs each gateway
//! as a child process (`isthmus run --config ...`, output to its log file):
//!
//! | member | cluster | locality | trust domain | addresses |
//! | --- | --- | --- | --- | --- |
//! | `east` | `east` | us-east / us-east-1a | `east.demo` | 127.0.10.1, standard ports |
//! | `west` | `west` | eu-west / eu-west-1a | `west.demo` | 127.0.20.1 |
//! | `vm` | `vm-edge` (a VM) | us-east / us-east-1b | `vm.demo` | 127.0.30.1 |
//!
//! Each federates with the other two, exports its services and serves DNS for
//! `clusterset.local`. Once every gateway is ready it prints the commands to
//! try, each on its own line starting with `curl ` or `dig `, then
//! `demo ready; Ctrl-C stops it`. A control API on 127.0.0.1:15999 stops
//! (SIGKILL, a dead cluster) and restarts members. SIGINT or SIGTERM stops the
//! gateways (SIGTERM) and removes the temporary directory.

mod http;
mod members;
mod supervisor;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};

use crate::exit::Exit;
use members::{
    ADMIN_PORT, DNS_PORT, ENDPOINTS, Endpoint, MEMBERS, MemberFiles, NAMESPACE, OUTBOUND_PORT,
    SERVICE_PORT,
};
use supervisor::{READY_TIMEOUT, Supervisor, log_tail};

/// The control API's address.
pub const CONTROL_ADDR: &str = "127.0.0.1:15999";
/// The last line printed once the demo is up.
pub const READY_LINE: &str = "demo ready; Ctrl-C stops it";

/// Runs the demo until SIGINT or SIGTERM; `work_dir` keeps its files there.
pub fn run(work_dir: Option<PathBuf>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("isthmus demo: cannot start a runtime: {e}");
            return Exit::Failure.into();
        }
    };
    let code = runtime.block_on(demo(work_dir));
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Writes `text` and a newline to stdout at once.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

fn fail(message: &str) -> ExitCode {
    eprintln!("isthmus demo: {message}");
    Exit::Failure.into()
}

/// Every address the demo listens on must be free: another demo (or a
/// gateway on the standard ports) would make it fail half-way.
fn check_ports() -> Result<(), String> {
    for spec in &MEMBERS {
        for (what, addr) in spec.listen_addrs() {
            TcpListener::bind(addr).map_err(|e| in_use(spec.name, what, addr, &e))?;
            if addr.port() == DNS_PORT {
                UdpSocket::bind(addr).map_err(|e| in_use(spec.name, what, addr, &e))?;
            }
        }
    }
    Ok(())
}

fn in_use(member: &str, what: &str, addr: SocketAddr, e: &std::io::Error) -> String {
    format!(
        "cannot listen on {addr} ({member}'s {what} port): {e}. Is another `isthmus demo` or gateway running?"
    )
}

async fn demo(work_dir: Option<PathBuf>) -> ExitCode {
    // The control port doubles as a lock against a second demo.
    let control = match tokio::net::TcpListener::bind(CONTROL_ADDR).await {
        Ok(l) => l,
        Err(e) => {
            return fail(&format!(
                "cannot listen on {CONTROL_ADDR} (the demo's control API): {e}. Is another `isthmus demo` running?"
            ));
        }
    };
    if let Err(e) = check_ports() {
        return fail(&e);
    }
    let bin = match std::env::current_exe() {
        Ok(bin) => bin,
        Err(e) => return fail(&format!("cannot find the isthmus binary: {e}")),
    };
    // Removed when this function returns, after the gateways stopped.
    let (temp, work) = match work_dir {
        Some(dir) => {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                return fail(&format!("{}: {e}", dir.display()));
            }
            match std::path::absolute(&dir) {
                Ok(abs) => (None, abs),
                Err(e) => return fail(&format!("{}: {e}", dir.display())),
            }
        }
        None => match tempfile::Builder::new().prefix("isthmus-demo-").tempdir() {
            Ok(t) => {
                let path = t.path().to_owned();
                (Some(t), path)
            }
            Err(e) => return fail(&format!("cannot make a temporary directory: {e}")),
        },
    };
    let code = match setup(&bin, &work).await {
        Ok(sup) => supervise(sup, control, temp.is_some()).await,
        Err(e) => fail(&e),
    };
    drop(temp);
    code
}

/// PKI, demo services and configuration files; nothing is started yet.
async fn setup(bin: &Path, work: &Path) -> Result<Arc<Supervisor>, String> {
    members::make_pki(work)?;
    let mut endpoints = Vec::new();
    for spec in &ENDPOINTS {
        let addr = http::start_endpoint(spec)
            .await
            .map_err(|e| format!("cannot start a demo service: {e}"))?;
        endpoints.push(Endpoint { spec, addr });
    }
    let mut files = Vec::new();
    for (i, spec) in MEMBERS.iter().enumerate() {
        let f = MemberFiles::new(work, spec);
        std::fs::write(&f.config, members::gateway_toml(i, &endpoints))
            .map_err(|e| format!("{}: {e}", f.config.display()))?;
        files.push(f);
    }
    Ok(Arc::new(Supervisor::new(bin.to_owned(), files)))
}

async fn supervise(sup: Arc<Supervisor>, control: tokio::net::TcpListener, temp: bool) -> ExitCode {
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => return fail(&format!("cannot handle signals: {e}")),
    };
    let work = sup.members[0]
        .files
        .dir
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default();
    say(&format!(
        "Isthmus demo: starting 3 gateways; configs, PKI and logs in {}{}",
        work.display(),
        if temp { " (removed on exit)" } else { "" }
    ));
    for member in &sup.members {
        if let Err(e) = sup.spawn(member) {
            sup.stop_all().await;
            return fail(&e);
        }
    }
    let ready = async {
        let waits: Vec<_> = (0..sup.members.len())
            .map(|i| {
                let sup = sup.clone();
                tokio::spawn(async move { sup.wait_ready(&sup.members[i], READY_TIMEOUT).await })
            })
            .collect();
        let mut results = Vec::new();
        for wait in waits {
            results.push(wait.await.unwrap_or_else(|e| Err(e.to_string())));
        }
        results
    };
    let results = tokio::select! {
        r = ready => r,
        _ = int.recv() => { sup.stop_all().await; return ExitCode::SUCCESS; }
        _ = term.recv() => { sup.stop_all().await; return ExitCode::SUCCESS; }
    };
    let mut failed = false;
    for (member, result) in sup.members.iter().zip(results) {
        if let Err(e) = result {
            failed = true;
            eprintln!(
                "isthmus demo: {} ({}) is not ready: {e}; the end of {}:\n{}",
                member.spec.name,
                member.spec.spiffe_id(),
                member.files.log.display(),
                log_tail(member, 30)
            );
        }
    }
    if failed {
        sup.stop_all().await;
        return Exit::Failure.into();
    }
    let control_sup = sup.clone();
    tokio::spawn(http::serve(control, move |req| {
        supervisor::control(control_sup.clone(), req)
    }));
    let ips = clusterset_ips().await;
    say(&guide(&sup, &ips));
    say(READY_LINE);

    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            biased;
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                for message in sup.reap() {
                    eprintln!("{message}");
                }
            }
        }
    }
    say("stopping the demo");
    sup.stop_all().await;
    say("demo stopped");
    ExitCode::SUCCESS
}

/// Clusterset IPs the guide shows: (gateway index, service) → IP, each
/// listening already.
#[derive(Debug, Default)]
struct ClustersetIps {
    east_hello: Option<String>,
    vm_checkout: Option<String>,
}

/// Reads a service's clusterset IP from a gateway's catalog and waits (a few
/// seconds at most) until its clusterset listener accepts connections.
async fn clusterset_ip(member: usize, service: &str) -> Option<String> {
    let admin = MEMBERS[member].addr(ADMIN_PORT);
    let name = format!("{NAMESPACE}/{service}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok((200, body)) = http::get(admin, "/debug/catalog").await
            && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body)
            && let Some(ip) = doc["services"].as_array().and_then(|services| {
                services
                    .iter()
                    .find(|s| s["service"] == name.as_str())
                    .and_then(|s| {
                        let ip = &s["clusterset_ip"];
                        ip["ipv4"].as_str().or_else(|| ip.as_str())
                    })
                    .map(str::to_owned)
            })
            && let Ok(addr) = format!("{ip}:{SERVICE_PORT}").parse::<SocketAddr>()
            && tokio::net::TcpStream::connect(addr).await.is_ok()
        {
            return Some(ip);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

async fn clusterset_ips() -> ClustersetIps {
    ClustersetIps {
        east_hello: clusterset_ip(0, "hello").await,
        vm_checkout: clusterset_ip(2, "checkout").await,
    }
}

/// The human guide: every command on its own line, starting with its name.
fn guide(sup: &Supervisor, ips: &ClustersetIps) -> String {
    let [east, west, vm] = &MEMBERS;
    let host =
        |svc: &str| format!("-H 'Host: {svc}.{NAMESPACE}.svc.clusterset.local:{SERVICE_PORT}'");
    let outbound = |m: &members::MemberSpec| format!("http://{}/", m.addr(OUTBOUND_PORT));
    let admin =
        |m: &members::MemberSpec, path: &str| format!("http://{}{path}", m.addr(ADMIN_PORT));
    let dig = |m: &members::MemberSpec| format!("dig @{} -p {DNS_PORT} +short", m.ip);
    let mut g = String::new();
    let mut line = |s: String| {
        g.push_str(&s);
        g.push('\n');
    };
    line(String::new());
    line("The federation (each gateway peers with the other two over mTLS):".into());
    line(format!(
        "  {:<4} {:<7} {:<8} {:<19} {:<40} {}",
        "name", "kind", "cluster", "locality", "SPIFFE ID", "address"
    ));
    for m in &sup.members {
        let s = m.spec;
        line(format!(
            "  {:<4} {:<7} {:<8} {:<19} {:<40} {}",
            s.name,
            s.kind,
            s.cluster,
            format!("{}/{}", s.region, s.zone),
            s.spiffe_id(),
            s.ip,
        ));
    }
    line(format!(
        "  Services: {NAMESPACE}/hello (east, west, vm); {NAMESPACE}/checkout (v1 in east and west, v2 in east). Ports on each gateway's address: admin {ADMIN_PORT}, outbound {OUTBOUND_PORT}, DNS {DNS_PORT}, federation 15012, east-west 15443. Logs: <work dir>/<name>/isthmus.log."
    ));
    line(String::new());
    line("DNS for clusterset.local on every gateway (A, SRV, TXT):".into());
    line(format!(
        "{} hello.{NAMESPACE}.svc.clusterset.local",
        dig(east)
    ));
    line(format!(
        "{} SRV _http._tcp.checkout.{NAMESPACE}.svc.clusterset.local",
        dig(vm)
    ));
    line(format!("{} TXT dns-version.clusterset.local", dig(west)));
    if let Some(ip) = &ips.east_hello {
        line(format!("{} -x {ip}", dig(east)));
    }
    line(String::new());
    line(
        "Call services through a gateway's outbound listener (the JSON says who answered):".into(),
    );
    line(format!("curl -fsS {} {}", host("hello"), outbound(east)));
    line(format!("curl -fsS {} {}", host("hello"), outbound(vm)));
    line(format!("curl -fsS {} {}", host("checkout"), outbound(west)));
    line(format!("curl -fsS {} {}", host("checkout"), outbound(vm)));
    if ips.east_hello.is_some() || ips.vm_checkout.is_some() {
        line("Or at a service's clusterset IP, as the DNS answers it:".into());
    }
    if let Some(ip) = &ips.east_hello {
        line(format!("curl -fsS http://{ip}:{SERVICE_PORT}/"));
    }
    if let Some(ip) = &ips.vm_checkout {
        line(format!("curl -fsS http://{ip}:{SERVICE_PORT}/"));
    }
    line(String::new());
    line("Canary: checkout is split v1 90 % / v2 10 % (v2 runs only in east); the header x-canary: true picks v2:".into());
    line(format!(
        "curl -fsS {} -H 'x-canary: true' {}",
        host("checkout"),
        outbound(vm)
    ));
    line(String::new());
    line("Look inside (admin API):".into());
    line(format!("curl -fsS {}", admin(vm, "/debug/catalog")));
    line(format!("curl -fsS {}", admin(east, "/debug/peers")));
    line(format!(
        "curl -fsS '{}'",
        admin(vm, &format!("/debug/explain?service={NAMESPACE}/checkout"))
    ));
    line(format!("curl -fsS {}", admin(west, "/readyz")));
    line(String::new());
    line("Failover: take cluster east down (its gateway is killed), call checkout from the VM (now served by west, canary included), see why, bring east back:".into());
    line(format!(
        "curl -fsS -X POST http://{CONTROL_ADDR}/clusters/east/stop"
    ));
    line(format!("curl -fsS {} {}", host("checkout"), outbound(vm)));
    line(format!(
        "curl -fsS '{}'",
        admin(vm, &format!("/debug/explain?service={NAMESPACE}/hello"))
    ));
    line(format!("curl -fsS http://{CONTROL_ADDR}/clusters"));
    line(format!(
        "curl -fsS -X POST http://{CONTROL_ADDR}/clusters/east/start"
    ));
    g
}
