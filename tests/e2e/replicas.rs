//! Replicas: several gateways of one cluster. Cluster A runs two, A1 and A2:
//! the same cluster name, trust domain and exports, in front of the same
//! endpoint, each with its own SPIFFE ID and addresses. B (no endpoint of
//! demo/echo, in A's zone) is where the client is; C serves demo/echo from
//! another region. While B carries 250 requests/s to demo/echo, A1 is killed
//! and restarted, then A2 is partitioned away with nftables and healed. No
//! request may fail, the other replica carries A's traffic, C gets none (A's
//! locality keeps it as long as one replica serves it), and a replica that
//! returns ramps up with slow start.
//!
//! Who served a request is told by the `x-forwarded-client-cert` header the
//! endpoint saw: `By=` names the replica that forwarded it.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::Duration;

use anyhow::{Context, Result};
use isthmus_tests::load::{Load, LoadSpec, Report};
use isthmus_tests::mesh::{Mesh, peer, remote_clusters};
use isthmus_tests::netns::{self, Partition, Reach};
use isthmus_tests::{EchoServer, Gateway, Verdicts, curl, machine_lock, metric_sum, wait_for};

const A1: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// Added by [`Mesh::add_replica`].
const A2: usize = 3;
const AUTHORITY: &str = "echo.demo.svc.clusterset.local:8080";
const START: Duration = Duration::from_secs(20);
/// Load before the first fault.
const STEADY: Duration = Duration::from_secs(3);
/// How long a replica stays killed, or partitioned.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// A failed replica gets no new requests this long after the fault.
const MOVE_WITHIN: Duration = Duration::from_secs(2);
/// A replica back (restarted, healed) serves again within this long.
const RETURN_WITHIN: Duration = Duration::from_secs(20);
/// B's `upstream.locality.slow_start_window`, short for the test.
const SLOW_START: Duration = Duration::from_secs(4);
/// Requests per second the load generator must reach through B.
const MIN_RATE: f64 = 200.0;

/// demo/echo on port 8080 (`http`) at `endpoint`, exported.
fn echo_service(endpoint: std::net::SocketAddr) -> String {
    format!(
        "[[services]]\nnamespace = \"demo\"\nname = \"echo\"\nports = [{{ port = 8080, name = \"http\" }}]\nendpoints = [\"{endpoint}\"]\nexport = true\n"
    )
}

/// A (two replicas), B and C, with A's and C's endpoints.
struct Federation {
    mesh: Mesh,
    echo_a: EchoServer,
    /// A1 and A2, by member index; `None` while killed.
    a: [Option<Gateway>; 2],
    b: Gateway,
    c: Gateway,
}

impl Federation {
    fn start() -> Result<Self> {
        let mut mesh = Mesh::new(&["a", "b", "c"]);
        mesh.set_locality(A1, "us-east", Some("us-east-1a"));
        mesh.set_locality(B, "us-east", Some("us-east-1a"));
        mesh.set_locality(C, "eu-west", Some("eu-west-1a"));
        assert_eq!(mesh.add_replica(A1, "a2"), A2);
        let echo_a = EchoServer::start("a");
        let echo_c = EchoServer::start("c");
        // A's replicas dial no one: their own dials would leave from
        // ephemeral ports that a port-based partition cannot catch. B and C
        // dial both replicas (and each other).
        let b_config = format!(
            "{}[upstream.locality]\nslow_start_window = \"{}s\"\n",
            mesh.config(B, &[A1, A2, C], ""),
            SLOW_START.as_secs()
        );
        let b = Gateway::start(&b_config, mesh.members[B].admin, &[])?;
        let c_config = mesh.config(C, &[A1, A2, B], &echo_service(echo_c.addr));
        let c = Gateway::start(&c_config, mesh.members[C].admin, &[])?;
        let mut fed = Self {
            mesh,
            echo_a,
            a: [None, None],
            b,
            c,
        };
        fed.start_replica(A1)?;
        fed.start_replica(A2)?;
        fed.b.wait_ready(START)?;
        fed.c.wait_ready(START)?;
        // B sees demo/echo from A through two gateway targets, and C's.
        wait_for(START, "B to see demo/echo at A1, A2 and C", || {
            let mut clusters = remote_clusters(&fed.b, "demo/echo")?;
            clusters.sort();
            (clusters == ["gw-a-cluster", "gw-a-cluster", "gw-c-cluster"]).then_some(())
        })
        .with_context(|| format!("B's catalog: {}", fed.b.admin_json("/debug/catalog")))?;
        let catalog = fed.b.admin_json("/debug/catalog");
        anyhow::ensure!(
            catalog["conflicts"].as_array().is_none_or(Vec::is_empty),
            "replicas of one cluster conflict: {}",
            catalog["conflicts"]
        );
        let url = format!("http://{}/", fed.mesh.members[B].outbound);
        let r = curl(&["-H", &format!("Host: {AUTHORITY}"), &url]);
        anyhow::ensure!(r.status == 200, "demo/echo through B: {r:?}");
        Ok(fed)
    }

    /// Starts (or restarts, same config and ports) replica `i` and waits
    /// until it is ready.
    fn start_replica(&mut self, i: usize) -> Result<()> {
        let config = self.mesh.config(i, &[], &echo_service(self.echo_a.addr));
        let mut gw = Gateway::start(&config, self.mesh.members[i].admin, &[])?;
        gw.wait_ready(START)?;
        self.a[slot(i)] = Some(gw);
        Ok(())
    }

    fn kill_replica(&mut self, i: usize) -> Result<()> {
        let mut gw = self.a[slot(i)].take().context("the replica runs")?;
        gw.signal("KILL")?;
        gw.wait_exit(Duration::from_secs(5))?;
        Ok(())
    }

    /// How the load labels a request that member `i` forwarded to its
    /// endpoint: the endpoint's name and the XFCC header `i` sent it.
    fn label(&self, i: usize) -> String {
        let (m, b) = (&self.mesh.members[i], &self.mesh.members[B]);
        format!(
            "{} via By={};URI={}",
            m.domain,
            m.spiffe_id(),
            b.spiffe_id()
        )
    }

    /// B's `/debug/peers` state of member `i` (`live`, `lapsed`...).
    fn peer_state(&self, i: usize) -> String {
        let peers = self.b.admin_json("/debug/peers");
        peer(&peers, &self.mesh.members[i].spiffe_id())
            .map_or("absent", |p| p["state"].as_str().unwrap_or("?"))
            .to_owned()
    }

    /// B's requests to demo/echo served by `cluster`, by its metrics.
    fn b_served(&self, cluster: &str) -> f64 {
        metric_sum(
            &self.b.admin_get("/metrics").body,
            "isthmus_requests_total",
            &[
                ("listener", "outbound"),
                ("service", "echo"),
                ("destination_cluster", cluster),
            ],
        )
    }
}

/// The index in [`Federation::a`] of replica `i`.
fn slot(i: usize) -> usize {
    usize::from(i == A2)
}

/// When the first request served by `label` started, after `since`.
fn wait_back(load: &Load, label: &str, since: Duration) -> Result<Duration> {
    wait_for(RETURN_WITHIN, &format!("{label} serving again"), || {
        load.snapshot()
            .samples
            .iter()
            .filter(|s| s.start >= since && s.served_by() == Some(label))
            .map(|s| s.start)
            .min()
    })
}

/// `label`'s share of the successes among requests started in `[from, to)`.
fn share(report: &Report, label: &str, from: Duration, to: Duration) -> f64 {
    let (mine, ok) = report.served(label, from, to);
    if ok == 0 {
        return 0.0;
    }
    mine as f64 / ok as f64
}

/// Checks that `label`, back at `back`, ramped up: a small share of its
/// cluster's traffic in the first second, about half once the window is
/// over. Logs its share per half second.
fn check_ramp(v: &mut Verdicts, report: &Report, label: &str, name: &str, back: Duration) {
    let half = Duration::from_millis(500);
    let mut shares = Vec::new();
    let mut from = back;
    while from < back + SLOW_START + Duration::from_secs(2) {
        shares.push(format!(
            "{:.0}%",
            100.0 * share(report, label, from, from + half)
        ));
        from += half;
    }
    eprintln!(
        "{name}'s share per 500 ms from its return at {back:.1?}: {}",
        shares.join(" ")
    );
    let first = share(report, label, back, back + Duration::from_secs(1));
    let after = back + SLOW_START + half;
    let later = share(report, label, after, after + Duration::from_secs(1));
    // Without slow start it takes half at once; ramping from 10 % of its
    // weight over 4 s, about 15 % of the first second.
    v.check(
        first < 0.3,
        format!(
            "{name} ramps up: {:.0}% of the first second back",
            first * 100.0
        ),
    );
    v.check(
        (0.35..=0.65).contains(&later),
        format!(
            "{name} takes its half once slow start is over: {:.0}%",
            later * 100.0
        ),
    );
}

#[test]
fn two_replicas_of_a_cluster_share_its_traffic_and_cover_for_each_other() {
    let _serial = (!netns::inside()).then(|| machine_lock("isthmus-failover-tests"));
    netns::run_isolated(
        "rep",
        "two_replicas_of_a_cluster_share_its_traffic_and_cover_for_each_other",
        || {
            let mut fed = Federation::start().unwrap();
            scenario(&mut fed).unwrap();
        },
    );
}

fn scenario(fed: &mut Federation) -> Result<()> {
    let mut v = Verdicts::default();
    let (a1, a2, c) = (fed.label(A1), fed.label(A2), fed.label(C));
    let load = Load::start(LoadSpec {
        via_header: Some("x-forwarded-client-cert".to_owned()),
        ..LoadSpec::new(fed.mesh.members[B].outbound, AUTHORITY)
    });

    // Steady: both replicas carry A's traffic.
    load.sleep_until(STEADY);

    // A1 killed, later restarted on the same config and ports.
    let killed_at = load.elapsed();
    fed.kill_replica(A1)?;
    eprintln!("A1 killed at {killed_at:.3?}");
    load.sleep_until(killed_at + DOWN_FOR);
    let restarted_at = load.elapsed();
    fed.start_replica(A1)?;
    let a1_back = wait_back(&load, &a1, restarted_at)?;
    eprintln!("A1 restarted at {restarted_at:.3?}, serving again at {a1_back:.3?}");
    load.sleep_until(a1_back + SLOW_START + Duration::from_secs(2));

    // A2 partitioned: its process stays up, packets to and from its
    // east-west and federation ports vanish.
    let a2_member = &fed.mesh.members[A2];
    let a2_addrs = [a2_member.east_west, a2_member.federation];
    let partitioned_at = load.elapsed();
    let ports = a2_addrs.map(|a| a.port());
    let mut partition = Partition::drop_tcp_ports("isthmus_replica", &ports)?;
    eprintln!(
        "A2 partitioned at {partitioned_at:.3?}:\n{}",
        partition.listing()?
    );
    for addr in a2_addrs {
        let reach = netns::probe(addr, Duration::from_millis(300));
        v.check(
            reach == Reach::Silent,
            format!("partition blackholes {addr}: {reach:?}"),
        );
    }
    load.sleep_until(partitioned_at + MOVE_WITHIN);
    // Leases are per replica: A2's lapsed, A1's holds.
    let (a1_state, a2_state) = (fed.peer_state(A1), fed.peer_state(A2));
    v.check(
        a1_state == "live" && a2_state != "live",
        format!("B's peers during the partition: A1 {a1_state}, A2 {a2_state}"),
    );
    load.sleep_until(partitioned_at + DOWN_FOR);
    let healed_at = load.elapsed();
    partition.heal()?;
    for addr in a2_addrs {
        let reach = netns::probe(addr, Duration::from_secs(1));
        v.check(reach == Reach::Open, format!("healed: {addr}: {reach:?}"));
    }
    let a2_back = wait_back(&load, &a2, healed_at)?;
    eprintln!("A2 healed at {healed_at:.3?}, serving again at {a2_back:.3?}");
    load.sleep_until(a2_back + SLOW_START + Duration::from_secs(2));
    let report = load.stop();
    eprintln!("{}", report.summary());

    let end = report.duration;
    let failures = report.failures().len();
    let (c_served, ok) = report.served(&c, Duration::ZERO, end);
    let steady = (Duration::from_millis(500), killed_at);
    let (a1_steady, a2_steady) = (
        share(&report, &a1, steady.0, steady.1),
        share(&report, &a2, steady.0, steady.1),
    );
    let (a1_dead, ok_dead) = report.served_within(&a1, killed_at + MOVE_WITHIN, restarted_at);
    let (a2_cut, ok_cut) = report.served_within(&a2, partitioned_at + MOVE_WITHIN, healed_at);
    let b_to_c = fed.b_served("gw-c-cluster");
    eprintln!(
        "MEASURED replicas: rate {:.0}/s, {failures} failed of {}, max latency {:.0?}, \
         steady shares A1 {:.0}% A2 {:.0}%, A1 served {a1_dead}/{ok_dead} from {MOVE_WITHIN:?} \
         after its kill until its restart, A2 served {a2_cut}/{ok_cut} from {MOVE_WITHIN:?} \
         into its partition until healed, C served {c_served}/{ok} (B's metrics: {b_to_c}), \
         A1 back {:.1?} after its restart, A2 back {:.1?} after the heal",
        report.rate(),
        report.total(),
        report.max_latency(),
        a1_steady * 100.0,
        a2_steady * 100.0,
        a1_back - restarted_at,
        a2_back - healed_at,
    );

    v.check(
        report.rate() >= MIN_RATE,
        format!("load reaches {MIN_RATE}/s: {:.0}/s", report.rate()),
    );
    v.check(
        failures == 0,
        format!("no request failed: {failures} failed"),
    );
    v.check(
        (0.35..=0.65).contains(&a1_steady) && (0.35..=0.65).contains(&a2_steady),
        format!(
            "steady: the replicas share A's traffic: A1 {:.0}%, A2 {:.0}%",
            a1_steady * 100.0,
            a2_steady * 100.0
        ),
    );
    v.check(
        ok_dead > 0 && a1_dead == 0,
        format!("A1 killed: A2 serves all: A1 served {a1_dead}/{ok_dead}"),
    );
    v.check(
        ok_cut > 0 && a2_cut == 0,
        format!("A2 partitioned: A1 serves all: A2 served {a2_cut}/{ok_cut}"),
    );
    // One replica serving A keeps A's locality whole: nothing leaves for C,
    // not even retries of the requests the faults stranded.
    v.check(
        c_served == 0 && b_to_c == 0.0,
        format!("C served none: {c_served}/{ok} (B's metrics: {b_to_c})"),
    );
    check_ramp(&mut v, &report, &a1, "A1", a1_back);
    check_ramp(&mut v, &report, &a2, "A2", a2_back);
    // Every request attributed to A2 went through A2 (it ran throughout).
    let a2_gw = fed.a[slot(A2)].as_ref().context("A2 runs")?;
    let a2_east_west = metric_sum(
        &a2_gw.admin_get("/metrics").body,
        "isthmus_requests_total",
        &[("listener", "east_west"), ("service", "echo")],
    );
    let (a2_served, _) = report.served(&a2, Duration::ZERO, end);
    v.check(
        a2_east_west >= a2_served as f64 && a2_served > 0,
        format!("A2's east-west metrics count what it served: {a2_east_west} >= {a2_served}"),
    );
    if !v.all_passed() {
        for path in [
            "/debug/peers",
            "/debug/upstreams",
            "/debug/explain?service=demo/echo",
        ] {
            eprintln!("B's {path} now: {}", fed.b.admin_get(path).body);
        }
    }
    v.finish();
    Ok(())
}
