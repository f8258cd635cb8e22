//! Zero-downtime operations under load: binary upgrade (SIGUSR2, Pingora's
//! listening-socket handoff), configuration reload (SIGHUP), and the stop
//! (SIGTERM) that waits for requests in flight. Real gateway processes, real
//! sockets; the load is a steady 250 requests/s over keep-alive connections.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use isthmus_tests::load::{Load, LoadSpec};
use isthmus_tests::{
    Behaviour, EchoServer, Gateway, curl, free_addr, metric_sum, send_signal, solo_config, wait_for,
};

const AUTHORITY: &str = "web.shop";

/// A gateway process this test did not spawn (the new process of an
/// upgrade): killed when the test ends, whatever happens.
struct Adopted(u32);

impl Drop for Adopted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

fn alive(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The pid of the `n`th new process the log says an upgrade started (from 1).
fn upgrade_pid(gw: &Gateway, n: usize) -> u32 {
    wait_for(
        Duration::from_secs(10),
        "the binary upgrade to start",
        || {
            gw.log_json()
                .iter()
                .filter(|l| l["message"] == "SIGUSR2 received: binary upgrade started")
                .nth(n - 1)
                .and_then(|l| l["pid"].as_u64())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", gw.log())) as u32
}

/// Waits until the process `pid` (not our child: children need reaping) has exited.
fn wait_gone(gw: &Gateway, pid: u32, what: &str) -> Duration {
    let start = Instant::now();
    wait_for(Duration::from_secs(20), what, || {
        (!alive(pid)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", gw.log()));
    start.elapsed()
}

/// A gateway in front of two echo servers with its upgrade socket in a
/// directory of its own; returns it ready with its outbound address.
fn gateway(
    endpoints: &[&EchoServer],
    extra: &str,
    dir: &tempfile::TempDir,
) -> (Gateway, SocketAddr) {
    let (admin, outbound) = (free_addr(), free_addr());
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|e| format!("\"{}\"", e.addr))
        .collect();
    let config = solo_config(admin, outbound, &endpoints.join(", "), extra);
    let socket = dir.path().join("upgrade.sock");
    let mut gw = Gateway::start(
        &config,
        admin,
        &[("ISTHMUS__RUNTIME__UPGRADE_SOCKET", socket.to_str().unwrap())],
    )
    .unwrap();
    gw.wait_ready(Duration::from_secs(20)).unwrap();
    (gw, outbound)
}

#[test]
fn binary_upgrades_and_a_reload_under_load_lose_no_request() {
    let (a, b) = (EchoServer::start("a"), EchoServer::start("b"));
    let dir = tempfile::tempdir().unwrap();
    let (mut old, outbound) = gateway(&[&a, &b], "", &dir);
    let old_pid = old.pid();
    let load = Load::start(LoadSpec::new(outbound, AUTHORITY));
    std::thread::sleep(Duration::from_secs(2));

    // First upgrade: the process we started hands over to a new one.
    old.signal("USR2").unwrap();
    let new = Adopted(upgrade_pid(&old, 1));
    let (status, took) = old.wait_exit(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", old.log());
    eprintln!("upgrade 1: old process {old_pid} exited {took:.1?} after SIGUSR2");
    assert!(
        alive(new.0),
        "new process {} died; log:\n{}",
        new.0,
        old.log()
    );
    assert_eq!(old.admin_get("/readyz").status, 200);

    // A reload of the new process, still under load.
    std::thread::sleep(Duration::from_secs(1));
    send_signal(new.0, "HUP").unwrap();
    wait_for(Duration::from_secs(5), "the reload", || {
        old.log().contains("configuration reloaded").then_some(())
    })
    .unwrap();

    // Second upgrade: the upgraded process can be upgraded in turn.
    std::thread::sleep(Duration::from_secs(1));
    send_signal(new.0, "USR2").unwrap();
    let newer = Adopted(upgrade_pid(&old, 2));
    let took = wait_gone(&old, new.0, "the first new process to exit");
    eprintln!(
        "upgrade 2: process {} exited {took:.1?} after SIGUSR2",
        new.0
    );
    assert!(alive(newer.0), "newest process died; log:\n{}", old.log());
    std::thread::sleep(Duration::from_secs(2));
    let report = load.stop();

    eprintln!("{}", report.summary());
    assert!(
        report.failures().is_empty(),
        "{}\nlog:\n{}",
        report.summary(),
        old.log()
    );
    assert!(report.total() > 1500, "{}", report.summary());
    // The newest process holds the listeners and has carried traffic.
    let metrics = old.admin_get("/metrics").body;
    let served = metric_sum(&metrics, "isthmus_requests_total", &[]);
    assert!(
        served > 0.0,
        "the newest process served nothing:\n{metrics}"
    );
    assert!(curl(&["-H", "Host: web.shop", &format!("http://{outbound}/")]).status == 200);
}

#[test]
fn an_upgrade_that_fails_its_checks_leaves_the_old_process_serving() {
    let a = EchoServer::start("a");
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, outbound) = gateway(&[&a], "", &dir);
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), good.replace("threads = 2", "threads = 0")).unwrap();

    gw.signal("USR2").unwrap();
    let child = upgrade_pid(&gw, 1);
    gw.wait_log(
        "binary upgrade: the new process exited",
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(!alive(child));
    let log = gw.log();
    assert!(log.contains("runtime.threads"), "{log}");
    assert!(log.contains("exit status: 78"), "{log}");
    assert!(alive(gw.pid()), "the old process stopped:\n{log}");
    assert_eq!(gw.admin_get("/readyz").status, 200);
    let r = curl(&["-H", "Host: web.shop", &format!("http://{outbound}/")]);
    assert_eq!(r.status, 200, "{}", r.body);

    // Once the file is fixed, the next attempt succeeds.
    std::fs::write(gw.config_path(), good).unwrap();
    gw.signal("USR2").unwrap();
    let new = Adopted(upgrade_pid(&gw, 2));
    let (status, _) = gw.wait_exit(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(alive(new.0));
    let r = curl(&["-H", "Host: web.shop", &format!("http://{outbound}/")]);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn sigterm_closes_the_listeners_then_waits_for_requests_in_flight() {
    let slow = EchoServer::start("slow");
    slow.set(Behaviour::Delay(Duration::from_secs(2)));
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, outbound) = gateway(&[&slow], "[shutdown]\ndrain_timeout = \"10s\"", &dir);
    let request =
        std::thread::spawn(move || curl(&["-H", "Host: web.shop", &format!("http://{outbound}/")]));
    // Well inside the echo server's 2 s delay: the request is in flight.
    std::thread::sleep(Duration::from_millis(500));

    let stopped = Instant::now();
    gw.signal("TERM").unwrap();
    // The listener closes at once...
    wait_for(Duration::from_secs(2), "the listener to close", || {
        TcpStream::connect_timeout(&outbound, Duration::from_millis(200))
            .is_err()
            .then_some(())
    })
    .unwrap();
    // ...and the request in flight still gets its answer.
    let r = request.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let (status, _) = gw.wait_exit(Duration::from_secs(10)).unwrap();
    let took = stopped.elapsed();
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(took >= Duration::from_millis(1500), "exited after {took:?}");
    assert!(took < Duration::from_secs(6), "exited after {took:?}");
    assert!(gw.log().contains("drained"), "{}", gw.log());
}
