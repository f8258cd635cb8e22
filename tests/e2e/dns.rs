//! DNS end to end, with real clients (`dig`, `kdig`) against the real binary:
//! `clusterset.local` per the MCS DNS spec 1.0.0, forwarding to a real
//! upstream (NSD), TCP fallback on truncation, garbage packets, clusterset IPs
//! that are stable across restarts and that accept traffic.
//!
//! Each test uses its own clusterset range, so parallel tests never bind the
//! same clusterset IP and port.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use isthmus_tests::dns::{Nsd, dig, kdig_short, upstream_zone};
use isthmus_tests::mesh::{Mesh, reload, web_service};
use isthmus_tests::{EchoServer, Gateway, curl, free_addr, metric_value, minimal_config, wait_for};

/// A gateway without identity serving `services` (TOML) with `[dns]` on
/// `dns` and the given extra `[dns]` keys.
fn dns_gateway(dns: SocketAddr, dns_keys: &str, services: &str) -> (String, SocketAddr) {
    let admin = free_addr();
    let config = format!(
        "{}[dns]\nlisten = \"{dns}\"\n{dns_keys}\n{services}",
        minimal_config("gw-dns", admin)
    );
    (config, admin)
}

/// [`dns_gateway`] started and ready.
fn ready_dns_gateway(dns: SocketAddr, dns_keys: &str, services: &str) -> Result<Gateway> {
    let (config, admin) = dns_gateway(dns, dns_keys, services);
    let mut gw = Gateway::start(&config, admin, &[])?;
    gw.wait_ready(Duration::from_secs(20))?;
    Ok(gw)
}

fn db_endpoints(n: u8) -> String {
    (1..=n)
        .map(|i| format!("\"127.0.1.{i}:5432\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn clusterset_local_answers_per_the_mcs_spec_forwards_the_rest_and_survives_garbage() -> Result<()>
{
    let upstream = Nsd::start(&[("upstream.test.", &upstream_zone(""))], "")?;
    let web = EchoServer::start("web-here");
    let state = tempfile::tempdir()?;
    let dns = free_addr();
    let dns_keys = format!(
        "clusterset_ipv4_range = \"127.241.0.0/16\"\nclusterset_ipv6_range = \"fd00:1::/112\"\nstate_file = \"{}\"\nupstreams = [\"{}\"]\nttl = \"7s\"\n",
        state.path().join("clusterset-ips.json").display(),
        upstream.addr
    );
    // Nothing listens at db's endpoints: with health checks off, DNS still
    // publishes every one of them.
    let services = format!(
        r#"[upstream.health_check]
interval = "0s"
[[services]]
namespace = "shop"
name = "web"
ports = [{{ port = 8080, name = "http" }}]
endpoints = ["{web}"]
export = true
[[services]]
namespace = "shop"
name = "internal"
ports = [{{ port = 80 }}]
endpoints = ["{web}"]
[[services]]
namespace = "data"
name = "db"
headless = true
export = true
ports = [{{ port = 5432, name = "postgres", protocol = "tcp" }}]
endpoints = [{db}]
"#,
        web = web.addr,
        db = db_endpoints(40)
    );
    let (config, admin) = dns_gateway(dns, &dns_keys, &services);
    let mut gw = Gateway::start(&config, admin, &[])?;
    gw.wait_ready(Duration::from_secs(20))?;

    // A: the clusterset IP, authoritative, with the configured TTL.
    let a = dig(dns, &["web.shop.svc.clusterset.local", "A"]);
    assert_eq!(a.status, "NOERROR", "{}", a.raw);
    assert!(a.has_flag("aa"), "{}", a.raw);
    let ip = a.data("A").first().cloned().context("an A record")?;
    assert!(ip.starts_with("127.241."), "{ip}");
    assert_eq!(a.answers[0].ttl, 7);
    // The same address on /debug/catalog.
    let catalog = gw.admin_json("/debug/catalog");
    let web_entry = catalog["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == "shop/web"))
        .context("shop/web on /debug/catalog")?;
    assert_eq!(web_entry["clusterset_ip"]["ipv4"], ip.as_str());
    // AAAA from the IPv6 range; kdig agrees on both.
    let aaaa = dig(dns, &["web.shop.svc.clusterset.local", "AAAA"]).data("AAAA");
    assert!(
        aaaa.len() == 1 && aaaa[0].starts_with("fd00:1::"),
        "{aaaa:?}"
    );
    assert_eq!(
        kdig_short(dns, &["web.shop.svc.clusterset.local", "A"])?,
        [ip.as_str()]
    );
    // SRV for the named port, with the target's addresses as additionals.
    let srv = dig(dns, &["_http._tcp.web.shop.svc.clusterset.local", "SRV"]);
    assert_eq!(
        srv.data("SRV"),
        ["0 100 8080 web.shop.svc.clusterset.local."],
        "{}",
        srv.raw
    );
    assert!(
        srv.additional
            .iter()
            .any(|r| r.rtype == "A" && r.data == ip),
        "{}",
        srv.raw
    );
    assert_eq!(
        kdig_short(
            dns,
            &["+tcp", "_http._tcp.web.shop.svc.clusterset.local", "SRV"]
        )?,
        ["0 100 8080 web.shop.svc.clusterset.local."]
    );
    // TXT dns-version.
    let txt = dig(dns, &["dns-version.clusterset.local", "TXT"]);
    assert_eq!(txt.data("TXT"), ["\"1.0.0\""], "{}", txt.raw);
    // PTR for the allocated IP.
    let ptr = dig(dns, &["-x", &ip]);
    assert_eq!(
        ptr.data("PTR"),
        ["web.shop.svc.clusterset.local."],
        "{}",
        ptr.raw
    );
    // Headless: every endpoint (health checks are off).
    let headless = dig(dns, &["+tcp", "db.data.svc.clusterset.local", "A"]).data("A");
    assert_eq!(headless.len(), 40, "{headless:?}");
    // NXDOMAIN for unknown names and for a service nobody exports, with the SOA.
    for name in [
        "nope.shop.svc.clusterset.local",
        "internal.shop.svc.clusterset.local",
    ] {
        let nx = dig(dns, &[name, "A"]);
        assert_eq!(nx.status, "NXDOMAIN", "{name}: {}", nx.raw);
        assert!(nx.authority.iter().any(|r| r.rtype == "SOA"), "{}", nx.raw);
    }
    // A forwarded name, from the upstream (twice: the second from the cache).
    for _ in 0..2 {
        let fwd = dig(dns, &["www.upstream.test", "A"]);
        assert_eq!(fwd.data("A"), ["192.0.2.10"], "{}", fwd.raw);
        assert!(fwd.has_flag("ra") && !fwd.has_flag("aa"), "{}", fwd.raw);
    }
    let nx_fwd = dig(dns, &["nope.upstream.test", "A"]);
    assert_eq!(nx_fwd.status, "NXDOMAIN", "{}", nx_fwd.raw);

    // Truncation: 40 A records do not fit 512 bytes. Without EDNS, UDP
    // answers with TC set; dig then retries over TCP and gets all 40.
    let truncated = dig(
        dns,
        &["+noedns", "+ignore", "db.data.svc.clusterset.local", "A"],
    );
    assert!(truncated.has_flag("tc"), "{}", truncated.raw);
    assert!(truncated.answers.len() < 40);
    let retried = dig(dns, &["+noedns", "db.data.svc.clusterset.local", "A"]);
    assert_eq!(retried.data("A").len(), 40, "{}", retried.raw);

    // Garbage over UDP and TCP: FORMERR or silence, and the server goes on.
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    udp.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 5],
        vec![0u8; 12], // a header claiming nothing
        b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00".to_vec(), // a "response"
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc".to_vec(), // label overrun
    ];
    junk.push((0..2000u32).map(|i| (i * 7919 % 251) as u8).collect());
    for packet in &junk {
        udp.send_to(packet, dns)?;
    }
    let mut formerr = 0;
    let mut buf = [0u8; 512];
    while let Ok((n, _)) = udp.recv_from(&mut buf) {
        if n >= 4 && buf[3] & 0x0f == 1 {
            formerr += 1;
        }
    }
    assert!(formerr >= 1, "malformed queries with a header get FORMERR");
    let mut tcp = TcpStream::connect(dns)?;
    tcp.write_all(b"\x00\x05hello\x00\x00")?;
    drop(tcp);
    let still = dig(dns, &["web.shop.svc.clusterset.local", "A"]);
    assert_eq!(still.data("A"), [ip.as_str()]);

    // Traffic to the clusterset IP: by name (curl resolving with our answer)
    // and by bare address (routed by the address the client reached).
    let by_name = curl(&[
        "--resolve",
        &format!("web.shop.svc.clusterset.local:8080:{ip}"),
        "http://web.shop.svc.clusterset.local:8080/",
    ]);
    assert_eq!(by_name.status, 200, "{by_name:?}");
    assert!(by_name.body.contains("web-here"), "{}", by_name.body);
    let by_ip = curl(&[&format!("http://{ip}:8080/")]);
    assert_eq!(by_ip.status, 200, "{by_ip:?}");

    // Metrics by type and rcode.
    let metrics = gw.admin_get("/metrics").body;
    for (series, at_least) in [
        (
            r#"isthmus_dns_queries_total{rcode="NOERROR",source="clusterset",type="A"}"#,
            3.0,
        ),
        (
            r#"isthmus_dns_queries_total{rcode="NXDOMAIN",source="clusterset",type="A"}"#,
            2.0,
        ),
        (
            r#"isthmus_dns_queries_total{rcode="NOERROR",source="forward",type="A"}"#,
            2.0,
        ),
        (r#"isthmus_dns_malformed_total{transport="udp"}"#, 4.0),
        ("isthmus_dns_truncated_total", 1.0),
        ("isthmus_dns_clusterset_ips", 1.0),
        ("isthmus_clusterset_listeners", 2.0),
    ] {
        let got = metric_value(&metrics, series).unwrap_or(0.0);
        assert!(got >= at_least, "{series} = {got}");
    }

    // Stable across a restart (the state file).
    gw.signal("TERM")?;
    gw.wait_exit(Duration::from_secs(15))?;
    let mut again = Gateway::start(&config, admin, &[])?;
    again.wait_ready(Duration::from_secs(20))?;
    let after = dig(dns, &["web.shop.svc.clusterset.local", "A"]);
    assert_eq!(
        after.data("A"),
        [ip],
        "the clusterset IP survives a restart"
    );
    Ok(())
}

#[test]
fn without_upstreams_other_names_are_refused() -> Result<()> {
    let dns = free_addr();
    let _gw = ready_dns_gateway(dns, "clusterset_ipv4_range = \"127.243.0.0/16\"", "")?;
    assert_eq!(dig(dns, &["example.com", "A"]).status, "REFUSED");
    assert_eq!(
        dig(dns, &["dns-version.clusterset.local", "TXT"]).status,
        "NOERROR"
    );
    Ok(())
}

#[test]
fn a_service_exported_by_a_peer_resolves_and_is_reachable_at_its_clusterset_ip() -> Result<()> {
    let mesh = Mesh::new(&["a", "b"]);
    let web = EchoServer::start("web-in-a");
    let dns = free_addr();
    let b_dns = format!("[dns]\nlisten = \"{dns}\"\nclusterset_ipv4_range = \"127.242.0.0/16\"\n");
    let mut a = Gateway::start(
        &mesh.full_config(0, &web_service(web.addr, true)),
        mesh.members[0].admin,
        &[],
    )?;
    let mut b = Gateway::start(&mesh.full_config(1, &b_dns), mesh.members[1].admin, &[])?;
    a.wait_ready(Duration::from_secs(20))?;
    b.wait_ready(Duration::from_secs(20))?;
    let ip = wait_for(Duration::from_secs(5), "shop/web in B's DNS", || {
        dig(dns, &["web.shop.svc.clusterset.local", "A"])
            .data("A")
            .first()
            .cloned()
    })?;
    let mut last = None;
    let response = wait_for(Duration::from_secs(5), "the clusterset listener", || {
        let r = curl(&[&format!("http://{ip}:8080/")]);
        if r.status == 200 {
            return Some(r);
        }
        last = Some(r);
        None
    })
    .with_context(|| format!("last answer {last:?}; B's log:\n{}", b.log()))?;
    assert!(response.body.contains("web-in-a"), "{}", response.body);

    // Withdrawn on A: gone from B's DNS, and nothing listens there any more.
    reload(&a, &mesh.full_config(0, &web_service(web.addr, false)))?;
    wait_for(
        Duration::from_secs(5),
        "NXDOMAIN after the withdrawal",
        || (dig(dns, &["web.shop.svc.clusterset.local", "A"]).status == "NXDOMAIN").then_some(()),
    )?;
    wait_for(Duration::from_secs(5), "the listener closed", || {
        TcpStream::connect_timeout(&format!("{ip}:8080").parse().ok()?, Duration::from_secs(1))
            .is_err()
            .then_some(())
    })?;
    Ok(())
}

#[test]
fn reverse_answers_carry_the_soa_of_the_reverse_zone_and_other_reverse_names_are_refused()
-> Result<()> {
    // A /20: not on an octet boundary, so its reverse zones are the sixteen
    // /24 zones it covers (127.251.16.0 to 127.251.31.255).
    let web = EchoServer::start("web");
    let dns = free_addr();
    let services = format!(
        "[[services]]\nnamespace = \"shop\"\nname = \"web\"\nports = [{{ port = 8080 }}]\nendpoints = [\"{}\"]\nexport = true\n",
        web.addr
    );
    let _gw = ready_dns_gateway(
        dns,
        "clusterset_ipv4_range = \"127.251.16.0/20\"\nclusterset_ipv6_range = \"fd00:251::/112\"",
        &services,
    )?;
    let ip = dig(dns, &["web.shop.svc.clusterset.local", "A"])
        .data("A")
        .first()
        .cloned()
        .context("shop/web's clusterset IP")?;
    let ptr = dig(dns, &["-x", &ip]);
    assert_eq!(
        ptr.data("PTR"),
        ["web.shop.svc.clusterset.local."],
        "{}",
        ptr.raw
    );
    assert!(ptr.has_flag("aa"), "{}", ptr.raw);

    // An address of the range nobody has (127.251.31.254 is the last usable
    // one; web got another): NXDOMAIN, authoritative, with the SOA of the
    // reverse zone the name is in, not clusterset.local's.
    let free = if ip == "127.251.31.254" {
        "127.251.31.253"
    } else {
        "127.251.31.254"
    };
    let nx = dig(dns, &["-x", free]);
    assert_eq!(nx.status, "NXDOMAIN", "{}", nx.raw);
    assert!(nx.has_flag("aa"), "{}", nx.raw);
    let soa: Vec<&str> = nx
        .authority
        .iter()
        .filter(|r| r.rtype == "SOA")
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(soa, ["31.251.127.in-addr.arpa."], "{}", nx.raw);
    // The zone's apex answers its SOA (dig and kdig).
    let apex = dig(dns, &["31.251.127.in-addr.arpa", "SOA"]);
    assert_eq!(apex.status, "NOERROR", "{}", apex.raw);
    assert_eq!(apex.answers.len(), 1, "{}", apex.raw);
    assert_eq!(apex.answers[0].name, "31.251.127.in-addr.arpa.");
    let kdig_soa = kdig_short(dns, &["16.251.127.in-addr.arpa", "SOA"])?;
    assert!(
        kdig_soa.len() == 1 && kdig_soa[0].starts_with("ns.dns.clusterset.local. "),
        "{kdig_soa:?}"
    );
    // IPv6: the /112 is one zone of 28 nibbles.
    let nx6 = dig(dns, &["-x", "fd00:251::ffff"]);
    assert_eq!(nx6.status, "NXDOMAIN", "{}", nx6.raw);
    let v6_apex = format!("{}d.f.ip6.arpa.", "0.".repeat(20) + "1.5.2.0.0.0.");
    assert!(
        nx6.authority
            .iter()
            .any(|r| r.rtype == "SOA" && r.name == v6_apex),
        "{v6_apex}: {}",
        nx6.raw
    );

    // Outside every zone we are authoritative for (the /20's parent, an
    // address past its end): REFUSED, as any name is without upstreams.
    for (name, rtype) in [
        ("251.127.in-addr.arpa", "SOA"),
        ("1.32.251.127.in-addr.arpa", "PTR"),
        ("1.15.251.127.in-addr.arpa", "PTR"),
    ] {
        let out = dig(dns, &[name, rtype]);
        assert_eq!(out.status, "REFUSED", "{name}: {}", out.raw);
    }
    Ok(())
}

/// A TCP endpoint that accepts (and closes) connections until dropped,
/// when it stops listening.
struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Endpoint {
    fn start(addr: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn headless_answers_leave_out_endpoints_the_gateways_health_checks_mark_down() -> Result<()> {
    // Two endpoints at addresses of their own; the gateway probes them every
    // 200 ms and needs one failure to mark one down, one success to bring it
    // back.
    let first = Endpoint::start("127.0.29.1:0")?;
    let second = Endpoint::start("127.0.29.2:0")?;
    let first_addr = first.addr;
    let dns = free_addr();
    let services = format!(
        r#"[upstream.health_check]
interval = "200ms"
timeout = "500ms"
unhealthy_threshold = 1
healthy_threshold = 1
[[services]]
namespace = "data"
name = "db"
headless = true
export = true
ports = [{{ port = 5432, name = "postgres", protocol = "tcp" }}]
endpoints = ["{first_addr}", "{}"]
"#,
        second.addr
    );
    let gw = ready_dns_gateway(
        dns,
        "clusterset_ipv4_range = \"127.252.0.0/16\"\nttl = \"1s\"",
        &services,
    )?;
    let db = "db.data.svc.clusterset.local";
    let addresses = || dig(dns, &[db, "A"]).data("A");
    assert_eq!(addresses(), ["127.0.29.1", "127.0.29.2"]);
    assert_eq!(kdig_short(dns, &[db, "A"])?, ["127.0.29.1", "127.0.29.2"]);
    // Endpoints without a hostname are named by their address: one SRV
    // record per ready endpoint and named port, each target resolving.
    let srv_name = "_postgres._tcp.db.data.svc.clusterset.local";
    let own = |ip: &str| format!("{ip}.test-cluster.db.data.svc.clusterset.local.");
    assert_eq!(
        kdig_short(dns, &[srv_name, "SRV"])?,
        [
            format!("0 100 5432 {}", own("127-0-29-1")),
            format!("0 100 5432 {}", own("127-0-29-2"))
        ]
    );
    assert_eq!(
        dig(dns, &[&own("127-0-29-2"), "A"]).data("A"),
        ["127.0.29.2"]
    );

    // The second endpoint stops listening: its probes fail, and DNS stops
    // publishing it (the MCS DNS spec publishes ready endpoints only).
    drop(second);
    wait_for(Duration::from_secs(10), "127.0.29.2 out of DNS", || {
        (addresses() == ["127.0.29.1"]).then_some(())
    })
    .with_context(|| gw.log())?;
    assert_eq!(kdig_short(dns, &["+tcp", db, "A"])?, ["127.0.29.1"]);
    assert_eq!(
        dig(dns, &[&own("127-0-29-2"), "A"]).status,
        "NXDOMAIN",
        "a held-out endpoint's own name goes too"
    );

    // No ready endpoint at all: NXDOMAIN with the zone's SOA, for the
    // service's SRV name too (its names do not exist).
    drop(first);
    let nx = wait_for(
        Duration::from_secs(10),
        "NXDOMAIN with no ready endpoint",
        || {
            let out = dig(dns, &[db, "A"]);
            (out.status == "NXDOMAIN").then_some(out)
        },
    )
    .with_context(|| gw.log())?;
    assert!(
        nx.authority
            .iter()
            .any(|r| r.rtype == "SOA" && r.name == "clusterset.local."),
        "{}",
        nx.raw
    );
    let srv = dig(dns, &[srv_name, "SRV"]);
    assert_eq!(srv.status, "NXDOMAIN", "{}", srv.raw);

    // The first comes back: published again after one passing probe.
    let _back = Endpoint::start(&first_addr.to_string())?;
    wait_for(Duration::from_secs(10), "127.0.29.1 back in DNS", || {
        (addresses() == ["127.0.29.1"]).then_some(())
    })
    .with_context(|| gw.log())?;
    Ok(())
}
