//! What everyday clients expect of an HTTP intermediary, checked with curl
//! through two real gateways (curl → A outbound → SPIFFE mTLS → B east-west →
//! an upstream in B's cluster): interim responses (RFC 9110 §15.2) and the
//! request-header size limit (RFC 6585 §5, RFC 9113 §8.2).
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::process::Command;

use isthmus_tests::EchoServer;
use isthmus_tests::two_clusters::TwoClusters;

const HOST: &str = "Host: web.shop.svc.clusterset.local:8080";

/// The client protocols of A's outbound listener, as curl flags.
const CLIENT_PROTOCOLS: [(&str, &[&str]); 2] = [
    ("HTTP/1.1", &["--http1.1"]),
    ("h2c", &["--http2-prior-knowledge"]),
];

/// curl `args` with `-v`: (its output, its verbose trace).
fn curl_verbose(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-v", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl is installed");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// curl `args` with `-v`: (status line codes it saw, in order, the body, the
/// trace). The verbose trace lists every response header block, interim
/// ones included (`< HTTP/1.1 100 Continue`, `< HTTP/2 103`).
fn curl_statuses(args: &[&str]) -> (Vec<u16>, String, String) {
    let (body, trace) = curl_verbose(args);
    let statuses = trace
        .lines()
        .filter_map(|l| l.strip_prefix("< HTTP/"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    (statuses, body, trace)
}

#[test]
fn interim_responses_cross_both_hops_and_hop_by_hop_fields_stop_at_the_first() {
    let upstream = EchoServer::start("pod-in-b");
    let c = TwoClusters::builder().shop_web(upstream.addr).start();
    let url = format!("http://{}/upload", c.outbound_a);
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body.path(), vec![b'x'; 2 << 20]).unwrap();
    let data = format!("@{}", body.path().display());

    for (proto, flags) in CLIENT_PROTOCOLS {
        // A client that waits for 100 Continue before its body: curl waits
        // up to --expect100-timeout, then sends the body anyway, so a lost
        // 100 shows as a missing status line, not as a failure.
        let mut args = flags.to_vec();
        args.extend([
            "-H",
            HOST,
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "20",
            "--data-binary",
            &data,
            &url,
        ]);
        let (statuses, body, trace) = curl_statuses(&args);
        assert_eq!(statuses, [100, 200], "{proto}: {trace}");
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["body_len"], 2 << 20, "{proto}: {body}");

        // 103 Early Hints reaches the client with its link header, and the
        // final response follows.
        let early = format!("http://{}/early-hints", c.outbound_a);
        let mut args = flags.to_vec();
        args.extend(["-H", HOST, &early]);
        let (statuses, body, trace) = curl_statuses(&args);
        assert_eq!(statuses, [103, 200], "{proto}: {trace}");
        assert!(
            trace.contains("< link: </style.css>; rel=preload"),
            "{proto}: {trace}"
        );
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["path"], "/early-hints", "{proto}");
    }
    // RFC 9110 §7.6.1: an intermediary removes the fields Connection names
    // (they are for this hop only) and forwards the rest.
    let r = isthmus_tests::curl(&[
        "--http1.1",
        "-H",
        HOST,
        "-H",
        "Connection: keep-alive, x-hop-secret",
        "-H",
        "x-hop-secret: for-a-only",
        "-H",
        "x-end-to-end: kept",
        &format!("http://{}/", c.outbound_a),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let headers = &echo["headers"];
    assert_eq!(headers["x-end-to-end"], "kept", "{headers}");
    assert!(headers.get("x-hop-secret").is_none(), "{headers}");

    // HTTP/1.0 has no interim responses: that client gets the final one only.
    let early = format!("http://{}/early-hints", c.outbound_a);
    let (statuses, _, trace) = curl_statuses(&["--http1.0", "-H", HOST, &early]);
    assert_eq!(statuses, [200], "{trace}");
    for gw in [&c.a, &c.b] {
        let log = gw.log();
        assert!(
            !log.contains("more data than expected"),
            "interim responses confused the body framing: {log}"
        );
    }
}

/// curl `args` through `url` with one header `x-big` of `size` bytes: (the
/// status, the verbose trace). The header goes in a file (`-H @file`), which
/// keeps it off the command line.
fn curl_with_header_of(size: usize, flags: &[&str], url: &str) -> (u16, String) {
    let header = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(header.path(), format!("x-big: {}\n", "b".repeat(size))).unwrap();
    let file = format!("@{}", header.path().display());
    let mut args = flags.to_vec();
    args.extend([
        "-H",
        HOST,
        "-H",
        &file,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    ]);
    let (out, trace) = curl_verbose(&args);
    (out.trim().parse().unwrap_or(0), trace)
}

/// `size` KiB as bytes.
const fn kib(size: usize) -> usize {
    size << 10
}

#[test]
fn the_default_header_limit_is_64_kib_on_both_hops() {
    let upstream = EchoServer::start("pod-in-b");
    let c = TwoClusters::builder().shop_web(upstream.addr).start();
    let url = format!("http://{}/", c.outbound_a);
    // Just under the limit at A (HTTP/1.1, as sent) stays under it at B
    // (HTTP/2, as RFC 9113 counts it, with the headers A adds).
    let (status, trace) = curl_with_header_of(kib(60), &["--http1.1"], &url);
    assert_eq!(status, 200, "{trace}");
    let (status, trace) = curl_with_header_of(kib(40), &["--http2-prior-knowledge"], &url);
    assert_eq!(status, 200, "{trace}");
    // Over it: 431 from A itself, not a 431 of B's that A relayed.
    let (status, trace) = curl_with_header_of(kib(70), &["--http1.1"], &url);
    assert_eq!(status, 431, "{trace}");
    assert_answered_by_a(&c);
}

/// A answered the 431s itself: it proxied none to B (a relayed one would be
/// counted with B's cluster as destination).
fn assert_answered_by_a(c: &TwoClusters) {
    let metrics = c.a.admin_get("/metrics").body;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("isthmus_requests_total") && l.contains("code=\"431\"")),
        "A relayed a 431: {metrics}"
    );
}

#[test]
fn request_headers_over_a_configured_limit_get_431_on_http1_and_h2_without_retries() {
    let upstream = EchoServer::start("pod-in-b");
    // One limit, 32 KiB, on both gateways: under curl's own 64 KiB ceiling
    // for the header block it sends over HTTP/2.
    let limit = "[limits]\nmax_request_header_bytes = 32768\n";
    let c = TwoClusters::builder()
        .a(limit)
        .b(limit)
        .shop_web(upstream.addr)
        .start();
    let url = format!("http://{}/", c.outbound_a);
    for (proto, flags) in CLIENT_PROTOCOLS {
        let (status, trace) = curl_with_header_of(kib(28), flags, &url);
        assert_eq!(status, 200, "{proto}: {trace}");
        // A 431 response the client takes as the answer: no stream reset
        // inviting a retry, no second attempt.
        let (status, trace) = curl_with_header_of(kib(48), flags, &url);
        assert_eq!(status, 431, "{proto}: {trace}");
        assert!(!trace.contains("retrying"), "{proto}: {trace}");
    }
    assert_answered_by_a(&c);
}
