//! The daemon's lifecycle with the real binary: readiness, metrics, SIGHUP reload
//! (good and bad), graceful stop, and the systemd notification protocol.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use isthmus_tests::{Gateway, free_addr, metric_value, minimal_config, wait_for};

const START: Duration = Duration::from_secs(20);

#[test]
fn serves_survives_a_bad_reload_applies_a_good_one_and_stops_on_sigterm() {
    let admin = free_addr();
    let config = minimal_config("gw-life", admin);
    let mut gw = Gateway::start(&config, admin, &[]).unwrap();
    gw.wait_ready(START).unwrap();

    // Admin API answers.
    assert_eq!(gw.admin_get("/healthz").status, 200);
    let metrics = gw.admin_get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("isthmus_build_info{"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains("isthmus_process_resident_memory_bytes")
    );
    let debug: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/debug/config").body).unwrap();
    assert_eq!(debug["gateway"]["name"], "gw-life");
    assert_eq!(debug["shutdown"]["drain_timeout"], "3s");
    assert_eq!(gw.admin_get("/nope").status, 404);

    // A broken config on SIGHUP: rejected, logged with its path, counted; still serving.
    std::fs::write(
        gw.config_path(),
        config.replace("[log]", "[log]\nbogus = true"),
    )
    .unwrap();
    gw.signal("HUP").unwrap();
    gw.wait_log("configuration reload rejected", Duration::from_secs(5))
        .unwrap();
    let rejected = gw
        .log_json()
        .into_iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("reload rejected:"))
        })
        .expect("a JSON log line per problem");
    assert_eq!(rejected["path"], "log.bogus");
    assert_eq!(rejected["level"], "ERROR");
    let metrics = gw.admin_get("/metrics").body;
    assert_eq!(
        metric_value(&metrics, "isthmus_config_reloads_total{result=\"error\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(gw.admin_get("/readyz").status, 200);
    let debug: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/debug/config").body).unwrap();
    assert_eq!(
        debug["shutdown"]["drain_timeout"], "3s",
        "old config still in force"
    );

    // A good config on SIGHUP is applied.
    std::fs::write(gw.config_path(), config.replace("\"3s\"", "\"4s\"")).unwrap();
    gw.signal("HUP").unwrap();
    gw.wait_log("configuration reloaded", Duration::from_secs(5))
        .unwrap();
    let debug: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/debug/config").body).unwrap();
    assert_eq!(debug["shutdown"]["drain_timeout"], "4s");
    let metrics = gw.admin_get("/metrics").body;
    assert_eq!(
        metric_value(&metrics, "isthmus_config_reloads_total{result=\"success\"}"),
        Some(1.0)
    );

    // SIGTERM: exit 0 within 5 s.
    gw.signal("TERM").unwrap();
    let (status, took) = gw.wait_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(gw.log().contains("isthmus stopped"));
    // Every line the gateway wrote is JSON with the contract's fields, including
    // Pingora's own `log` records, bridged into the same pipeline.
    assert!(
        gw.log_json().iter().any(|l| l["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("pingora_core"))),
        "no bridged pingora log line"
    );
    for line in gw.log().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "message"] {
            assert!(v.get(field).is_some(), "no {field} in {line}");
        }
    }
}

#[test]
fn sigint_also_stops_gracefully() {
    let admin = free_addr();
    let mut gw = Gateway::start(&minimal_config("gw-int", admin), admin, &[]).unwrap();
    gw.wait_ready(START).unwrap();
    gw.signal("INT").unwrap();
    let (status, _) = gw.wait_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(gw.log().contains("SIGINT"));
}

/// Plays systemd: receives sd_notify datagrams on NOTIFY_SOCKET and checks the
/// sequence READY → WATCHDOG pings → RELOADING → READY → STOPPING.
#[test]
fn speaks_the_systemd_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let admin = free_addr();
    let config = minimal_config("gw-notify", admin);
    let mut gw = Gateway::start(
        &config,
        admin,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .unwrap();

    let mut seen = Vec::<String>::new();
    let recv_until = |want: &str, seen: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        wait_for(Duration::from_secs(10), want, || {
            let n = sock.recv(&mut buf).ok()?;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(msg.clone());
            msg.lines().any(|l| l == want).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}; received {seen:?}; log:\n{}", gw.log()));
    };

    recv_until("READY=1", &mut seen);
    // Ready for systemd means ready for the admin API too.
    assert_eq!(gw.admin_get("/readyz").status, 200);
    recv_until("WATCHDOG=1", &mut seen);
    recv_until("WATCHDOG=1", &mut seen);

    gw.signal("HUP").unwrap();
    recv_until("RELOADING=1", &mut seen);
    let reloading = seen.last().unwrap().clone();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    recv_until("READY=1", &mut seen);

    gw.signal("TERM").unwrap();
    recv_until("STOPPING=1", &mut seen);
    let (status, _) = gw.wait_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(0));
}
