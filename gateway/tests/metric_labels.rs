//! Every value of every closed metric label vocabulary is documented in
//! `docs/metrics.md`, under its metric.
//!
//! Each vocabulary is an enum defined with `isthmus_federation::label_enum!`:
//! its `ALL` lists every value the code can export, so a value added to an
//! enum fails this test until the metric's row in `docs/metrics.md` names it
//! in backquotes, together with the label it belongs to. The values the
//! dashboards and the e2e tests read are therefore the ones the documentation
//! promises. (The hub's refusal reasons and bundle outcomes are checked against
//! their metrics' help text by the peering tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test reports failure

use std::collections::BTreeSet;
use std::path::Path;

use isthmus_federation::discovery::FailureKind;
use isthmus_federation::dns::{
    AnswerSource, PolicyRefusal, QueryType, RateLimitAction, Rcode, TcpRefusal, Transport,
};
use isthmus_federation::trust::{FetchResult, HandshakeResult, HandshakeSide, MaterialKind};
use isthmus_gateway::admin::Route;
use isthmus_gateway::dns::BindError;
use isthmus_gateway::lifecycle::ReloadResult;
use isthmus_gateway::limits::RefusalReason;
use isthmus_gateway::metrics::{Listener, Profile};
use isthmus_gateway::proxy::{Direction, L4Result, RequestError};
use isthmus_gateway::telemetry::DropReason;
use isthmus_gateway::upstream::{CutReason, HealthCheckResult, RetryReason};

/// One closed label of one metric: the metric, the label's name and every
/// value it can take.
struct Vocabulary {
    metric: &'static str,
    label: &'static str,
    values: Vec<&'static str>,
}

/// `(metric, label, Enum)`: the vocabulary of `label` on `metric` is `Enum::ALL`.
macro_rules! vocabularies {
    ($(($metric:literal, $label:literal, $enum:ty)),+ $(,)?) => {
        vec![$(Vocabulary {
            metric: $metric,
            label: $label,
            values: <$enum>::ALL.iter().map(|v| v.label()).collect(),
        }),+]
    };
}

fn every_vocabulary() -> Vec<Vocabulary> {
    vocabularies![
        ("isthmus_build_info", "profile", Profile),
        ("isthmus_config_reloads_total", "result", ReloadResult),
        ("isthmus_admin_requests_total", "route", Route),
        ("isthmus_tls_reloads_total", "kind", MaterialKind),
        ("isthmus_tls_reload_errors_total", "kind", MaterialKind),
        ("isthmus_trust_bundle_fetches_total", "result", FetchResult),
        ("isthmus_tls_handshakes_total", "side", HandshakeSide),
        ("isthmus_tls_handshakes_total", "result", HandshakeResult),
        ("isthmus_request_errors_total", "reason", RequestError),
        ("isthmus_tcp_connections_total", "result", L4Result),
        ("isthmus_tcp_bytes_total", "direction", Direction),
        ("isthmus_connections_refused_total", "listener", Listener),
        ("isthmus_connections_refused_total", "reason", RefusalReason),
        ("isthmus_header_timeouts_total", "listener", Listener),
        ("isthmus_connections_open", "listener", Listener),
        ("isthmus_upstream_retries_total", "reason", RetryReason),
        ("isthmus_tracing_spans_dropped_total", "reason", DropReason),
        (
            "isthmus_upstream_health_checks_total",
            "result",
            HealthCheckResult
        ),
        ("isthmus_upstream_peer_cuts_total", "reason", CutReason),
        ("isthmus_discovery_errors_total", "kind", FailureKind),
        ("isthmus_dns_queries_total", "type", QueryType),
        ("isthmus_dns_queries_total", "rcode", Rcode),
        ("isthmus_dns_queries_total", "source", AnswerSource),
        ("isthmus_dns_malformed_total", "transport", Transport),
        ("isthmus_dns_overloaded_total", "transport", Transport),
        ("isthmus_dns_refused_total", "reason", PolicyRefusal),
        ("isthmus_dns_rate_limited_total", "action", RateLimitAction),
        (
            "isthmus_dns_tcp_connections_refused_total",
            "reason",
            TcpRefusal
        ),
        (
            "isthmus_clusterset_listener_errors_total",
            "reason",
            BindError
        ),
    ]
}

fn metrics_doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The table row of `metric`: the line whose first cell names it.
fn row<'a>(doc: &'a str, metric: &str) -> Option<&'a str> {
    let name = format!("`{metric}`");
    doc.lines().find(|line| {
        line.strip_prefix('|')
            .and_then(|rest| rest.split('|').next())
            .is_some_and(|cell| cell.split(',').any(|m| m.trim() == name))
    })
}

#[test]
fn every_label_value_is_documented_under_its_metric() {
    let doc = metrics_doc();
    let mut missing = Vec::new();
    for v in every_vocabulary() {
        let Some(row) = row(&doc, v.metric) else {
            missing.push(format!("{}: no row", v.metric));
            continue;
        };
        if !row.contains(&format!("`{}`", v.label)) {
            missing.push(format!("{}: label `{}`", v.metric, v.label));
        }
        for value in &v.values {
            if !row.contains(&format!("`{value}`")) {
                missing.push(format!("{}{{{}=\"{value}\"}}", v.metric, v.label));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/metrics.md does not document:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn every_vocabulary_is_nonempty_and_its_values_distinct() {
    for v in every_vocabulary() {
        assert!(!v.values.is_empty(), "{} {}", v.metric, v.label);
        let distinct: BTreeSet<_> = v.values.iter().collect();
        assert_eq!(
            distinct.len(),
            v.values.len(),
            "{} {}: {:?}",
            v.metric,
            v.label,
            v.values
        );
    }
}

#[test]
fn the_row_finder_reads_the_first_cell_only() {
    let doc = "| `isthmus_a_total`, `isthmus_b` | counter | `x` | the same as `isthmus_c` |\n";
    assert!(row(doc, "isthmus_a_total").is_some());
    assert!(row(doc, "isthmus_b").is_some());
    assert!(row(doc, "isthmus_c").is_none());
    assert!(row(doc, "isthmus_a").is_none());
}
