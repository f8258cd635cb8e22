//! Locality-aware failover under steady load, with real gateways: client
//! gateway C (us-east/us-east-1a, no endpoints of demo/echo) reaches demo/echo
//! exported by A (same zone: preferred) and B (eu-west/eu-west-1a). A is
//! killed, or partitioned away with nftables, while C carries 250 requests/s;
//! no client request may fail, traffic must leave A within 2 s and come back
//! once A does.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use isthmus_tests::load::{Load, LoadSpec, Report};
use isthmus_tests::mesh::{Mesh, remote_clusters};
use isthmus_tests::netns::{self, Partition, Reach};
use isthmus_tests::{EchoServer, Gateway, Verdicts, curl, machine_lock, metric_sum, wait_for};
use serde_json::Value;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const CLUSTER_A: &str = "gw-a-cluster";
const CLUSTER_B: &str = "gw-b-cluster";
const AUTHORITY: &str = "echo.demo.svc.clusterset.local:8080";
const START: Duration = Duration::from_secs(20);
/// When, after the load started, A is killed or partitioned...
const FAULT_AT: Duration = Duration::from_secs(3);
/// ...and for how long.
const FAULT_FOR: Duration = Duration::from_secs(7);
/// A dead peer gets no new requests this long after the fault.
const MOVE_WITHIN: Duration = Duration::from_secs(2);
/// A returned peer serves most requests of some second within this long.
const RETURN_WITHIN: Duration = Duration::from_secs(15);
/// Requests per second the load generator must reach through C.
const MIN_RATE: f64 = 200.0;
/// C's handshakes to peer gateways from the fault until `MOVE_WITHIN * 2`
/// after it: a few connections to B (one attempt at a time per peer), not
/// one per request stranded by the fault (hundreds before single-flight).
const MAX_FAILOVER_HANDSHAKES: f64 = 16.0;

/// demo/echo on port 8080 (`http`) at `endpoint`, exported.
fn echo_service(endpoint: SocketAddr) -> String {
    format!(
        "[[services]]\nnamespace = \"demo\"\nname = \"echo\"\nports = [{{ port = 8080, name = \"http\" }}]\nendpoints = [\"{endpoint}\"]\nexport = true\n"
    )
}

/// A, B and C with their upstreams; each upstream names its cluster.
struct Federation {
    mesh: Mesh,
    echo: [EchoServer; 2],
    a: Option<Gateway>,
    b: Gateway,
    c: Gateway,
    a_dials: Vec<usize>,
}

impl Federation {
    /// B and C dial every other member; A dials `a_dials`.
    fn start(a_dials: &[usize]) -> Result<Self> {
        let mut mesh = Mesh::new(&["a", "b", "c"]);
        // No tuning: the default lease (1.5 s) and grace (30 s).
        mesh.leases = None;
        mesh.set_locality(A, "us-east", Some("us-east-1a"));
        mesh.set_locality(B, "eu-west", Some("eu-west-1a"));
        mesh.set_locality(C, "us-east", Some("us-east-1a"));
        let echo = [EchoServer::start(CLUSTER_A), EchoServer::start(CLUSTER_B)];
        let b_config = mesh.full_config(B, &echo_service(echo[1].addr));
        let b = Gateway::start(&b_config, mesh.members[B].admin, &[])?;
        let c = Gateway::start(&mesh.full_config(C, ""), mesh.members[C].admin, &[])?;
        let mut fed = Self {
            mesh,
            echo,
            a: None,
            b,
            c,
            a_dials: a_dials.to_vec(),
        };
        fed.start_a()?;
        fed.b.wait_ready(START)?;
        fed.c.wait_ready(START)?;
        wait_for(START, "C to see demo/echo in A and B", || {
            let mut clusters = remote_clusters(&fed.c, "demo/echo")?;
            clusters.sort();
            (clusters == [CLUSTER_A, CLUSTER_B]).then_some(())
        })
        .with_context(|| format!("C's log:\n{}", fed.c.log()))?;
        let url = format!("http://{}/", fed.mesh.members[C].outbound);
        let r = curl(&["-H", &format!("Host: {AUTHORITY}"), &url]);
        anyhow::ensure!(r.status == 200, "demo/echo through C: {r:?}");
        Ok(fed)
    }

    /// Starts (or restarts, same config and ports) A and waits until ready.
    fn start_a(&mut self) -> Result<()> {
        let config = self
            .mesh
            .config(A, &self.a_dials, &echo_service(self.echo[0].addr));
        let mut a = Gateway::start(&config, self.mesh.members[A].admin, &[])?;
        a.wait_ready(START)?;
        self.a = Some(a);
        Ok(())
    }

    fn load_spec(&self) -> LoadSpec {
        LoadSpec::new(self.mesh.members[C].outbound, AUTHORITY)
    }

    /// C's requests served by `cluster` so far, by its metrics.
    fn served_metric(&self, cluster: &str) -> f64 {
        metric_sum(
            &self.c.admin_get("/metrics").body,
            "isthmus_requests_total",
            &[
                ("listener", "outbound"),
                ("namespace", "demo"),
                ("service", "echo"),
                ("destination_cluster", cluster),
            ],
        )
    }

    /// C's retries from A's cluster to B's, by its metrics.
    fn failovers_metric(&self) -> f64 {
        metric_sum(
            &self.c.admin_get("/metrics").body,
            "isthmus_upstream_failovers_total",
            &[
                ("namespace", "demo"),
                ("service", "echo"),
                ("from_cluster", CLUSTER_A),
                ("to_cluster", CLUSTER_B),
            ],
        )
    }

    /// C's TLS handshakes to peer gateways (every result).
    fn client_handshakes_metric(&self) -> f64 {
        metric_sum(
            &self.c.admin_get("/metrics").body,
            "isthmus_tls_handshakes_total",
            &[("side", "client")],
        )
    }

    /// C's `/debug/explain` of demo/echo (`Null` when it is not JSON).
    fn explain(&self) -> Value {
        let r = self.c.admin_get("/debug/explain?service=demo/echo");
        serde_json::from_str(&r.body).unwrap_or_else(|_| {
            eprintln!("/debug/explain answered {}: {}", r.status, r.body);
            Value::Null
        })
    }
}

/// The `(level, target)` pairs of an explain document.
fn explained(doc: &Value) -> Vec<(&Value, &Value)> {
    let mut out = Vec::new();
    for dest in doc["destinations"].as_array().into_iter().flatten() {
        for level in dest["levels"].as_array().into_iter().flatten() {
            for target in level["targets"].as_array().into_iter().flatten() {
                out.push((level, target));
            }
        }
    }
    out
}

/// Target `cluster` in an explain document, with its level.
fn explained_target<'a>(doc: &'a Value, cluster: &str) -> Option<(&'a Value, &'a Value)> {
    explained(doc)
        .into_iter()
        .find(|(_, t)| t["cluster"] == cluster)
}

/// How A is taken away and brought back.
enum Fault {
    /// SIGKILL, later a restart on the same config and ports.
    Kill,
    /// nftables drops to and from A's east-west and federation ports, later
    /// removed.
    Partition(Option<Partition>),
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Partition(_) => "partition",
        }
    }

    fn inflict(&mut self, fed: &mut Federation) -> Result<()> {
        match self {
            Fault::Kill => {
                let mut a = fed.a.take().context("A runs")?;
                a.signal("KILL")?;
                a.wait_exit(Duration::from_secs(5))?;
            }
            Fault::Partition(p) => {
                let ports = a_addrs(fed).map(|addr| addr.port());
                *p = Some(Partition::drop_tcp_ports("isthmus_partition", &ports)?);
            }
        }
        Ok(())
    }

    /// After [`Fault::inflict`]: checks that the partition blackholes A.
    fn verify(&self, fed: &Federation, v: &mut Verdicts) -> Result<()> {
        if let Fault::Partition(p) = self {
            let partition = p.as_ref().context("partitioned")?;
            eprintln!("partitioned A:\n{}", partition.listing()?);
            check_a_reach(fed, Duration::from_millis(300), Reach::Silent, v, |addr| {
                format!("partition blackholes {addr}")
            });
        }
        Ok(())
    }

    fn recover(&mut self, fed: &mut Federation, v: &mut Verdicts) -> Result<()> {
        match self {
            Fault::Kill => fed.start_a()?,
            Fault::Partition(p) => {
                p.as_mut().context("partitioned")?.heal()?;
                check_a_reach(fed, Duration::from_secs(1), Reach::Open, v, |addr| {
                    format!("healed: {addr} answers")
                });
            }
        }
        Ok(())
    }
}

/// A's east-west and federation addresses: what a partition cuts.
fn a_addrs(fed: &Federation) -> [SocketAddr; 2] {
    let a = &fed.mesh.members[A];
    [a.east_west, a.federation]
}

/// Probes each of A's addresses (for up to `wait`) and checks it is `want`;
/// `says` names the check for an address.
fn check_a_reach(
    fed: &Federation,
    wait: Duration,
    want: Reach,
    v: &mut Verdicts,
    says: impl Fn(SocketAddr) -> String,
) {
    for addr in a_addrs(fed) {
        let reach = netns::probe(addr, wait);
        v.check(reach == want, format!("{}: {reach:?}", says(addr)));
    }
}

/// Load through C; at [`FAULT_AT`] A fails, [`FAULT_FOR`] later it returns.
fn scenario(fed: &mut Federation, mut fault: Fault) -> Result<()> {
    let mut v = Verdicts::default();
    let load = Load::start(fed.load_spec());

    load.sleep_until(FAULT_AT);
    let handshakes_before = fed.client_handshakes_metric();
    let fault_at = load.elapsed();
    fault.inflict(fed)?;
    eprintln!(
        "{} of A at {fault_at:.3?} (done at {:.3?})",
        fault.name(),
        load.elapsed()
    );
    fault.verify(fed, &mut v)?;

    // C's explain every 100 ms for a while: A shows as down (until its
    // services expire, lease + grace after the fault, when it is gone).
    let mut explains: Vec<(Duration, Value)> = Vec::new();
    let mut b_served_then = None;
    while load.elapsed() < fault_at + MOVE_WITHIN * 2 {
        let since = load.elapsed() - fault_at;
        if b_served_then.is_none() && since >= MOVE_WITHIN {
            b_served_then = Some(fed.served_metric(CLUSTER_B));
        }
        explains.push((since, fed.explain()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let b_served_then = b_served_then.unwrap_or_default();
    let explain = explains.last().map(|(_, d)| d.clone()).unwrap_or_default();
    let b_served_later = fed.served_metric(CLUSTER_B);
    let failovers = fed.failovers_metric();
    let handshakes = fed.client_handshakes_metric() - handshakes_before;
    let metrics = fed.c.admin_get("/metrics").body;
    for line in metrics.lines().filter(|l| {
        l.starts_with("isthmus_upstream_peer_cuts_total")
            || l.starts_with("isthmus_upstream_retries_total")
            || l.starts_with("isthmus_request_errors_total")
    }) {
        eprintln!(
            "C's metrics {:.1?} after the {}: {line}",
            MOVE_WITHIN * 2,
            fault.name()
        );
    }

    load.sleep_until(fault_at + FAULT_FOR);
    let recover_at = load.elapsed();
    fault.recover(fed, &mut v)?;
    let recovered_at = load.elapsed();
    eprintln!("A back at {recover_at:.3?} (ready at {recovered_at:.3?})");

    // A later second (starting after A is back) mostly served by A.
    let first_second = recovered_at.as_secs() + 1;
    let returned = wait_for(RETURN_WITHIN, "traffic back on A", || {
        let snapshot = load.snapshot();
        let done = load
            .elapsed()
            .saturating_sub(Duration::from_millis(200))
            .as_secs();
        snapshot
            .buckets()
            .into_iter()
            .filter(|b| b.second >= first_second && b.second < done && b.ok > 0)
            .find(|b| b.share(CLUSTER_A) > 0.5)
            .map(|b| b.second)
    })
    .map_err(|e| e.to_string());
    if returned.is_err() {
        for path in ["/debug/peers", "/debug/upstreams"] {
            eprintln!("C's {path} now: {}", fed.c.admin_get(path).body);
        }
    }
    let report: Report = load.stop();

    // Measurements.
    eprintln!("{}", report.summary());
    let failures = report.failures().len();
    let last_a = report
        .last_served_by(CLUSTER_A, Duration::ZERO, recover_at)
        .map(|t| t.as_secs_f64() - fault_at.as_secs_f64());
    let (a_before, ok_before) = report.served(CLUSTER_A, Duration::ZERO, fault_at);
    let moved_at = fault_at + MOVE_WITHIN;
    let (a_after, ok_after) = report.served_within(CLUSTER_A, moved_at, recover_at);
    eprintln!(
        "MEASURED {}: rate {:.0}/s, {failures} failed of {}, max latency {:.0?}, \
         last request served by A {} after the {}, A served {a_before}/{ok_before} before \
         and {a_after}/{ok_after} from {MOVE_WITHIN:?} after until it was back, \
         traffic back on A in second {returned:?} (A back at {recover_at:.1?}), \
         C's metrics: B served {b_served_then} -> {b_served_later}, failovers A->B {failovers}, \
         handshakes to peers during the failover {handshakes}",
        fault.name(),
        report.rate(),
        report.total(),
        report.max_latency(),
        last_a.map_or("never".to_owned(), |s| format!("{s:+.3}s")),
        fault.name(),
    );

    // Infrastructure.
    v.check(
        report.rate() >= MIN_RATE,
        format!("load reaches {MIN_RATE}/s: {:.0}/s", report.rate()),
    );
    // The contract.
    v.check(
        failures == 0,
        format!("no request failed: {failures} failed"),
    );
    v.check(
        ok_before > 0 && a_before as f64 >= 0.95 * ok_before as f64,
        format!(
            "before the {}, >= 95 % from A (same zone): {a_before}/{ok_before}",
            fault.name()
        ),
    );
    v.check(
        ok_after > 0 && a_after == 0,
        format!(
            "from {MOVE_WITHIN:?} after the {} on, all from B: A served {a_after}/{ok_after}",
            fault.name()
        ),
    );
    v.check(
        b_served_later > b_served_then,
        format!("C's isthmus_requests_total to B grows: {b_served_then} -> {b_served_later}"),
    );
    v.check(
        failovers > 0.0,
        format!("C's isthmus_upstream_failovers_total A->B > 0: {failovers}"),
    );
    // The requests stranded by the fault move to B together: they wait for
    // one connection attempt per peer (single-flight), not one each.
    v.check(
        handshakes <= MAX_FAILOVER_HANDSHAKES,
        format!(
            "C's handshakes to peers during the failover <= {MAX_FAILOVER_HANDSHAKES}: {handshakes}"
        ),
    );
    // A's state in explain over time: (since the fault, state, load).
    let a_states: Vec<(Duration, String)> = explains
        .iter()
        .map(|(since, doc)| {
            let state = explained_target(doc, CLUSTER_A).map_or("absent".to_owned(), |(_, t)| {
                format!("{} {}%", t["state"], t["load_percent"])
            });
            (*since, state)
        })
        .collect();
    let mut timeline = String::new();
    for (i, (since, state)) in a_states.iter().enumerate() {
        if i == 0 || a_states[i - 1].1 != *state {
            timeline.push_str(&format!(" +{:.1}s: {state};", since.as_secs_f64()));
        }
    }
    eprintln!("A in C's explain after the {}:{timeline}", fault.name());
    let down = explains.iter().find_map(|(since, doc)| {
        let (_, t) = explained_target(doc, CLUSTER_A)?;
        (t["state"] == "down" && t["load_percent"].as_f64() == Some(0.0)).then_some(*since)
    });
    v.check(
        down.is_some(),
        format!("explain: A shown down with load 0 (first at {down:.1?}):{timeline}"),
    );
    let loaded_late = explains.iter().find(|(since, doc)| {
        *since >= MOVE_WITHIN
            && explained_target(doc, CLUSTER_A)
                .is_some_and(|(_, t)| t["load_percent"].as_f64() != Some(0.0))
    });
    v.check(
        loaded_late.is_none(),
        format!(
            "explain: A has no load from {MOVE_WITHIN:?} after the {} on: {:?}",
            fault.name(),
            loaded_late.map(|(since, _)| since)
        ),
    );
    let b_level = explained_target(&explain, CLUSTER_B).map(|(l, _)| l["load_percent"].clone());
    v.check(
        b_level.as_ref().and_then(Value::as_f64) == Some(100.0),
        format!("explain: B's level carries 100 %: {b_level:?}"),
    );
    v.check(
        returned.is_ok(),
        format!("traffic back on A within {RETURN_WITHIN:?}: {returned:?}"),
    );
    // Slow start: A ramps up from 10 % of its weight, so it cannot take most
    // of the first second after it is back.
    let first_share = report
        .buckets()
        .into_iter()
        .find(|b| b.second == first_second)
        .map(|b| b.share(CLUSTER_A));
    v.check(
        first_share.is_some_and(|s| s < 0.5),
        format!(
            "failback is gradual: A's share of the first second after it is back: {first_share:?}"
        ),
    );
    if !v.all_passed() {
        eprintln!(
            "last explain, {:.1?} after the fault: {explain:#}",
            MOVE_WITHIN * 2
        );
    }
    v.finish();
    Ok(())
}

#[test]
fn kill_preferred_cluster_costs_nothing() -> Result<()> {
    let _serial = machine_lock("isthmus-failover-tests");
    // Everyone dials everyone, so that the restarted A reconnects at once.
    let mut fed = Federation::start(&[B, C])?;
    scenario(&mut fed, Fault::Kill)
}

#[test]
fn partitioned_cluster_costs_nothing() {
    let _serial = (!netns::inside()).then(|| machine_lock("isthmus-failover-tests"));
    netns::run_isolated("fo", "partitioned_cluster_costs_nothing", || {
        // A dials no one: its own dials would leave from ephemeral ports that
        // a port-based partition cannot catch. B and C dial A (and each other).
        let mut fed = Federation::start(&[]).unwrap();
        scenario(&mut fed, Fault::Partition(None)).unwrap();
    });
}
