//! `[upstream]`: how the gateway treats the backends it forwards to — local
//! endpoints and peer gateways alike. Safe by default: every protection is on
//! with values that need no tuning for failover to work.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Check, int, parse_duration, unique_list};

/// Default TCP (and, to peer gateways, TLS) connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default longest silence of an upstream while a request waits on it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest idle time of a client or upstream connection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default tries per request, the first included.
pub const DEFAULT_MAX_ATTEMPTS: i64 = 3;
/// Default retry budget: retries may add this share of requests...
pub const DEFAULT_RETRY_BUDGET_PERCENT: i64 = 20;
/// ...and at least this many retries per second are always allowed.
pub const DEFAULT_RETRY_MIN_PER_SECOND: i64 = 10;
/// Default circuit-breaker limits per backend (Envoy's defaults).
pub const DEFAULT_CIRCUIT_LIMIT: i64 = 1024;
/// Default consecutive failures that eject a backend.
pub const DEFAULT_CONSECUTIVE_FAILURES: i64 = 5;
/// Default first ejection; each further ejection doubles it.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Default longest ejection.
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Default share of a service's backends that may be ejected at once.
pub const DEFAULT_MAX_EJECTION_PERCENT: i64 = 50;
/// Default interval between active health checks.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Default timeout of one health check.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default overprovisioning factor (Envoy's): a priority level keeps all its
/// traffic until fewer than 1/1.4 (71 %) of its backends are available.
pub const DEFAULT_OVERPROVISIONING_PERCENT: i64 = 140;
/// Default panic threshold: below this share of available backends across
/// every level, health is ignored (better a failing check than a sure error).
pub const DEFAULT_PANIC_THRESHOLD_PERCENT: i64 = 50;
/// Default slow start: a backend that comes back ramps from 10 % of its weight
/// to all of it over this long.
pub const DEFAULT_SLOW_START_WINDOW: Duration = Duration::from_secs(10);
/// Longest accepted timeout or interval.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `[upstream]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `upstream.connect_timeout`
    pub connect_timeout: Option<String>,
    /// `upstream.request_timeout`
    pub request_timeout: Option<String>,
    /// `upstream.idle_timeout`
    pub idle_timeout: Option<String>,
    /// `upstream.max_attempts`
    pub max_attempts: Option<i64>,
    /// `upstream.retry_budget_percent`
    pub retry_budget_percent: Option<i64>,
    /// `upstream.retry_min_per_second`
    pub retry_min_per_second: Option<i64>,
    /// `[upstream.circuit_breaker]`
    #[serde(default)]
    pub circuit_breaker: RawCircuitBreaker,
    /// `[upstream.outlier_detection]`
    #[serde(default)]
    pub outlier_detection: RawOutlierDetection,
    /// `[upstream.health_check]`
    #[serde(default)]
    pub health_check: RawHealthCheck,
    /// `[upstream.locality]`
    #[serde(default)]
    pub locality: RawLocalityPolicy,
}

/// `[upstream.locality]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocalityPolicy {
    /// `upstream.locality.failover_order`
    pub failover_order: Option<Vec<String>>,
    /// `upstream.locality.failover_priority`
    pub failover_priority: Option<Vec<String>>,
    /// `upstream.locality.overprovisioning_factor`
    pub overprovisioning_factor: Option<f64>,
    /// `upstream.locality.panic_threshold_percent`
    pub panic_threshold_percent: Option<i64>,
    /// `upstream.locality.slow_start_window`
    pub slow_start_window: Option<String>,
}

/// `[upstream.circuit_breaker]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    /// `upstream.circuit_breaker.max_connections`
    pub max_connections: Option<i64>,
    /// `upstream.circuit_breaker.max_pending_requests`
    pub max_pending_requests: Option<i64>,
    /// `upstream.circuit_breaker.max_requests`
    pub max_requests: Option<i64>,
}

/// `[upstream.outlier_detection]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierDetection {
    /// `upstream.outlier_detection.consecutive_failures`
    pub consecutive_failures: Option<i64>,
    /// `upstream.outlier_detection.base_ejection_time`
    pub base_ejection_time: Option<String>,
    /// `upstream.outlier_detection.max_ejection_time`
    pub max_ejection_time: Option<String>,
    /// `upstream.outlier_detection.max_ejection_percent`
    pub max_ejection_percent: Option<i64>,
}

/// `[upstream.health_check]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `upstream.health_check.interval`
    pub interval: Option<String>,
    /// `upstream.health_check.timeout`
    pub timeout: Option<String>,
    /// `upstream.health_check.unhealthy_threshold`
    pub unhealthy_threshold: Option<i64>,
    /// `upstream.health_check.healthy_threshold`
    pub healthy_threshold: Option<i64>,
}

/// `[upstream]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamConfig {
    /// Connecting to a backend (TCP, and TLS to peer gateways).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence of an upstream while a request waits on it: for the
    /// response headers and between chunks of the body.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest idle time of a kept-alive client connection, a pooled upstream
    /// connection and an L4 stream.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Tries per request, the first included.
    pub max_attempts: usize,
    /// Retries may add this percentage of requests (over ten seconds)...
    pub retry_budget_percent: u32,
    /// ...beyond at least this many retries per second.
    pub retry_min_per_second: u32,
    /// Limits per backend.
    pub circuit_breaker: CircuitBreakerConfig,
    /// Passive health: ejecting backends that fail.
    pub outlier_detection: OutlierDetectionConfig,
    /// Active health: probing backends.
    pub health_check: HealthCheckConfig,
    /// Priority levels by locality, spill-over, panic and slow start.
    pub locality: LocalityPolicy,
}

/// `[upstream.locality]`: how traffic is spread over localities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalityPolicy {
    /// Regions in the order traffic fails over to them after this gateway's
    /// own zone and region; unlisted regions come after the listed ones.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failover_order: Vec<String>,
    /// Label names, most important first: targets whose labels match this
    /// gateway's on all of them come first, then those matching all but the
    /// last, and so on; locality decides within (Istio's failoverPriority).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failover_priority: Vec<String>,
    /// The overprovisioning factor, in percent (140 is 1.4); shown as the
    /// factor it was written as.
    #[serde(rename = "overprovisioning_factor", serialize_with = "as_factor")]
    pub overprovisioning_percent: u32,
    /// Below this share of available backends (percent), health is ignored.
    pub panic_threshold_percent: u32,
    /// A recovered backend's weight ramps up over this long; 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub slow_start_window: Duration,
}

/// `[upstream.circuit_breaker]`: limits per backend; beyond them a request
/// goes to another backend or gets 503 at once instead of queueing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CircuitBreakerConfig {
    /// L4 connections open to one backend.
    pub max_connections: usize,
    /// HTTP requests waiting for a connection to one backend.
    pub max_pending_requests: usize,
    /// HTTP requests in flight to one backend.
    pub max_requests: usize,
}

/// `[upstream.outlier_detection]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetectionConfig {
    /// Consecutive 5xx responses or connect failures that eject a backend; 0 turns
    /// ejection off.
    pub consecutive_failures: u32,
    /// First ejection; the n-th lasts 2^(n-1) times as long.
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Longest ejection.
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// Share of a service's backends that may be ejected at once (one always may).
    pub max_ejection_percent: u32,
}

/// `[upstream.health_check]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheckConfig {
    /// Between probes of one backend; 0 turns active checks off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Of one probe.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Failed probes in a row that mark a backend unhealthy.
    pub unhealthy_threshold: u32,
    /// Passed probes in a row that mark it healthy again.
    pub healthy_threshold: u32,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        upstream(&mut Check::default(), &RawUpstream::default()).expect("defaults are valid")
    }
}

fn duration(
    check: &mut Check,
    path: &str,
    value: Option<&str>,
    default: Duration,
) -> Option<Duration> {
    check.or_value(path, value, default, |s| parse_duration(s, MAX_TIMEOUT))
}

pub(super) fn upstream(check: &mut Check, raw: &RawUpstream) -> Option<UpstreamConfig> {
    let connect_timeout = duration(
        check,
        "upstream.connect_timeout",
        raw.connect_timeout.as_deref(),
        DEFAULT_CONNECT_TIMEOUT,
    );
    let request_timeout = duration(
        check,
        "upstream.request_timeout",
        raw.request_timeout.as_deref(),
        DEFAULT_REQUEST_TIMEOUT,
    );
    let idle_timeout = duration(
        check,
        "upstream.idle_timeout",
        raw.idle_timeout.as_deref(),
        DEFAULT_IDLE_TIMEOUT,
    );
    for (path, d) in [
        ("upstream.connect_timeout", connect_timeout),
        ("upstream.request_timeout", request_timeout),
        ("upstream.idle_timeout", idle_timeout),
    ] {
        if d.is_some_and(|d| d < Duration::from_millis(1)) {
            check.fail(path, "must be at least 1ms");
        }
    }
    let max_attempts = int(
        check,
        "upstream.max_attempts",
        raw.max_attempts,
        DEFAULT_MAX_ATTEMPTS,
        1,
        10,
    );
    let budget = int(
        check,
        "upstream.retry_budget_percent",
        raw.retry_budget_percent,
        DEFAULT_RETRY_BUDGET_PERCENT,
        0,
        100,
    );
    let min_per_second = int(
        check,
        "upstream.retry_min_per_second",
        raw.retry_min_per_second,
        DEFAULT_RETRY_MIN_PER_SECOND,
        0,
        1_000_000,
    );
    let circuit_breaker = circuit_breaker(check, &raw.circuit_breaker);
    let outlier_detection = outlier_detection(check, &raw.outlier_detection);
    let health_check = health_check(check, &raw.health_check);
    let locality = locality(check, &raw.locality);
    Some(UpstreamConfig {
        connect_timeout: connect_timeout?,
        request_timeout: request_timeout?,
        idle_timeout: idle_timeout?,
        max_attempts: max_attempts?,
        retry_budget_percent: budget?,
        retry_min_per_second: min_per_second?,
        circuit_breaker: circuit_breaker?,
        outlier_detection: outlier_detection?,
        health_check: health_check?,
        locality: locality?,
    })
}

fn as_factor<S: serde::Serializer>(percent: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(f64::from(*percent) / 100.0)
}

fn locality(check: &mut Check, raw: &RawLocalityPolicy) -> Option<LocalityPolicy> {
    let failover_order = unique_list(
        check,
        "upstream.locality.failover_order",
        raw.failover_order.as_deref(),
        |region| {
            isthmus_federation::names::validate_label(region)
                .map(|()| region.to_owned())
                .map_err(|e| format!("region {e}"))
        },
        |region| format!("{region:?}"),
    );
    let failover_priority = unique_list(
        check,
        "upstream.locality.failover_priority",
        raw.failover_priority.as_deref(),
        |label| isthmus_federation::catalog::validate_label_name(label).map(|()| label.to_owned()),
        |label| format!("{label:?}"),
    );
    let overprovisioning = match raw.overprovisioning_factor {
        None => Some(DEFAULT_OVERPROVISIONING_PERCENT),
        Some(f) if (1.0..=10.0).contains(&f) => Some((f * 100.0).round() as i64),
        Some(f) => {
            check.fail(
                "upstream.locality.overprovisioning_factor",
                format!("{f} is out of range; expected 1.0 to 10.0"),
            );
            None
        }
    };
    let panic = int(
        check,
        "upstream.locality.panic_threshold_percent",
        raw.panic_threshold_percent,
        DEFAULT_PANIC_THRESHOLD_PERCENT,
        0,
        100,
    );
    let slow_start = duration(
        check,
        "upstream.locality.slow_start_window",
        raw.slow_start_window.as_deref(),
        DEFAULT_SLOW_START_WINDOW,
    );
    Some(LocalityPolicy {
        failover_order,
        failover_priority,
        overprovisioning_percent: overprovisioning? as u32,
        panic_threshold_percent: panic?,
        slow_start_window: slow_start?,
    })
}

fn circuit_breaker(check: &mut Check, raw: &RawCircuitBreaker) -> Option<CircuitBreakerConfig> {
    let mut limit = |key: &str, value| {
        int(
            check,
            &format!("upstream.circuit_breaker.{key}"),
            value,
            DEFAULT_CIRCUIT_LIMIT,
            1,
            10_000_000,
        )
    };
    let max_connections = limit("max_connections", raw.max_connections);
    let max_pending_requests = limit("max_pending_requests", raw.max_pending_requests);
    let max_requests = limit("max_requests", raw.max_requests);
    Some(CircuitBreakerConfig {
        max_connections: max_connections?,
        max_pending_requests: max_pending_requests?,
        max_requests: max_requests?,
    })
}

fn outlier_detection(
    check: &mut Check,
    raw: &RawOutlierDetection,
) -> Option<OutlierDetectionConfig> {
    let consecutive_failures = int(
        check,
        "upstream.outlier_detection.consecutive_failures",
        raw.consecutive_failures,
        DEFAULT_CONSECUTIVE_FAILURES,
        0,
        1000,
    );
    let base = duration(
        check,
        "upstream.outlier_detection.base_ejection_time",
        raw.base_ejection_time.as_deref(),
        DEFAULT_BASE_EJECTION_TIME,
    );
    let max = duration(
        check,
        "upstream.outlier_detection.max_ejection_time",
        raw.max_ejection_time.as_deref(),
        DEFAULT_MAX_EJECTION_TIME,
    );
    if let (Some(b), Some(m)) = (base, max) {
        if b.is_zero() {
            check.fail(
                "upstream.outlier_detection.base_ejection_time",
                "must be longer than 0s",
            );
        }
        if m < b {
            check.fail(
                "upstream.outlier_detection.max_ejection_time",
                format!(
                    "{} is shorter than base_ejection_time ({})",
                    humantime::format_duration(m),
                    humantime::format_duration(b)
                ),
            );
        }
    }
    let percent = int(
        check,
        "upstream.outlier_detection.max_ejection_percent",
        raw.max_ejection_percent,
        DEFAULT_MAX_EJECTION_PERCENT,
        0,
        100,
    );
    Some(OutlierDetectionConfig {
        consecutive_failures: consecutive_failures?,
        base_ejection_time: base?,
        max_ejection_time: max?,
        max_ejection_percent: percent?,
    })
}

fn health_check(check: &mut Check, raw: &RawHealthCheck) -> Option<HealthCheckConfig> {
    let interval = duration(
        check,
        "upstream.health_check.interval",
        raw.interval.as_deref(),
        DEFAULT_HEALTH_CHECK_INTERVAL,
    );
    let timeout = duration(
        check,
        "upstream.health_check.timeout",
        raw.timeout.as_deref(),
        DEFAULT_HEALTH_CHECK_TIMEOUT,
    );
    if timeout.is_some_and(|t| t.is_zero()) {
        check.fail("upstream.health_check.timeout", "must be longer than 0s");
    }
    let mut threshold = |key: &str, value, default| {
        int(
            check,
            &format!("upstream.health_check.{key}"),
            value,
            default,
            1,
            100,
        )
    };
    let unhealthy_threshold = threshold("unhealthy_threshold", raw.unhealthy_threshold, 2);
    let healthy_threshold = threshold("healthy_threshold", raw.healthy_threshold, 1);
    Some(HealthCheckConfig {
        interval: interval?,
        timeout: timeout?,
        unhealthy_threshold: unhealthy_threshold?,
        healthy_threshold: healthy_threshold?,
    })
}
