//! `pingora-floor`: the least a Pingora proxy can cost on the bench's paths, to
//! measure Isthmus against (see `tests/bench/proxy-bench.sh`).
//!
//! ```text
//! pingora-floor plain       --listen ADDR --origin ADDR
//! pingora-floor mesh-client --listen ADDR --peer ADDR --sni NAME [--cert PEM --key PEM]
//! pingora-floor mesh-server --listen ADDR --cert PEM --key PEM --origin ADDR
//! every mode also takes [--stats ADDR]
//! ```
//!
//! - `plain`: path (a). HTTP/1.1 in, HTTP/1.1 out to a fixed origin; an empty
//!   context, `upstream_peer` returns `HttpPeer::new(origin, false, "")`.
//! - `mesh-client`: the first hop of path (b). HTTP/1.1 in, TLS and HTTP/2 out
//!   through Pingora's own rustls connector with no verification of the peer
//!   (Isthmus checks the peer's SPIFFE ID; the floor checks nothing), offering
//!   the client certificate if one is given.
//! - `mesh-server`: the second hop. A TLS listener (`TlsSettings::intermediate`
//!   with HTTP/2 enabled; it asks for no client certificate) proxying HTTP/1.1
//!   to the origin.
//!
//! One worker thread, work stealing off. The global allocator is the one
//! Isthmus's binary uses (`gateway/src/main.rs`): the default features follow
//! it. The `mimalloc` and `jemalloc` features pick those instead (the system
//! allocator without either), to compare allocators on the floor.
//!
//! Allocation count: built with `--features count-allocations`, every call into
//! the global allocator is counted (stats_alloc around the system allocator: a
//! count of calls does not depend on which allocator serves them), and a TCP
//! connection to `--stats ADDR` is answered with one line, `allocations N`, then
//! closed. Without the feature the line is `allocations unavailable`.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session, http_proxy_service};
use pingora::server::configuration::ServerConf;
use pingora::utils::tls::CertKey;

#[cfg(feature = "count-allocations")]
#[global_allocator]
static GLOBAL: stats_alloc::StatsAlloc<std::alloc::System> = stats_alloc::StatsAlloc::system();

#[cfg(all(not(feature = "count-allocations"), feature = "mimalloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(
    not(feature = "count-allocations"),
    not(feature = "mimalloc"),
    feature = "jemalloc"
))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn allocations() -> String {
    #[cfg(feature = "count-allocations")]
    return format!("allocations {}\n", GLOBAL.stats().allocations);
    #[cfg(not(feature = "count-allocations"))]
    return "allocations unavailable\n".to_string();
}

/// Path (a), and the second hop of path (b): a fixed plain-HTTP origin.
struct ToOrigin {
    origin: SocketAddr,
}

#[async_trait]
impl ProxyHttp for ToOrigin {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.origin, false, String::new())))
    }
}

/// The first hop of path (b): TLS and HTTP/2 to the second hop.
struct ToPeer {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for ToPeer {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

struct Args {
    mode: String,
    flags: Vec<(String, String)>,
}

impl Args {
    fn parse() -> Args {
        let mut argv = std::env::args().skip(1);
        let mode = argv.next().unwrap_or_else(|| usage("no mode"));
        let mut flags = Vec::new();
        while let Some(flag) = argv.next() {
            let Some(name) = flag.strip_prefix("--") else {
                usage(&format!("unexpected {flag}"))
            };
            let value = argv
                .next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
            flags.push((name.to_string(), value));
        }
        Args { mode, flags }
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn need(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| usage(&format!("{} needs --{name}", self.mode)))
    }
    fn addr(&self, name: &str) -> SocketAddr {
        self.need(name)
            .parse()
            .unwrap_or_else(|e| usage(&format!("--{name}: {e}")))
    }
}

fn usage(why: &str) -> ! {
    eprintln!(
        "pingora-floor: {why}\nusage: pingora-floor plain --listen ADDR --origin ADDR\n       \
         pingora-floor mesh-client --listen ADDR --peer ADDR --sni NAME [--cert PEM --key PEM]\n       \
         pingora-floor mesh-server --listen ADDR --cert PEM --key PEM --origin ADDR\n       \
         (every mode: [--stats ADDR])"
    );
    std::process::exit(2)
}

/// DER certificates and key from PEM files, as Pingora's client side wants them.
fn cert_key(cert: &str, key: &str) -> CertKey {
    let (certs, key) = pingora::tls::load_certs_and_key_files(cert, key)
        .ok()
        .flatten()
        .unwrap_or_else(|| usage(&format!("no certificate and key in {cert} / {key}")));
    CertKey::new(
        certs.into_iter().map(|c| c.to_vec()).collect(),
        key.secret_der().to_vec(),
    )
}

fn serve_stats(addr: &str) {
    let listener =
        TcpListener::bind(addr).unwrap_or_else(|e| usage(&format!("--stats {addr}: {e}")));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = std::io::Write::write_all(&mut conn, allocations().as_bytes());
        }
    });
}

fn main() {
    let args = Args::parse();
    if let Some(addr) = args.get("stats") {
        serve_stats(addr);
    }
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let listen = args.need("listen");
    match args.mode.as_str() {
        "plain" => {
            let mut svc = http_proxy_service(
                &server.configuration,
                ToOrigin {
                    origin: args.addr("origin"),
                },
            );
            svc.add_tcp(listen);
            server.add_service(svc);
        }
        "mesh-client" => {
            let mut peer = HttpPeer::new(args.addr("peer"), true, args.need("sni").to_string());
            peer.options.verify_cert = false;
            peer.options.verify_hostname = false;
            peer.options.set_http_version(2, 2);
            if let Some(cert) = args.get("cert") {
                peer.client_cert_key = Some(Arc::new(cert_key(cert, args.need("key"))));
            }
            let mut svc = http_proxy_service(&server.configuration, ToPeer { peer });
            svc.add_tcp(listen);
            server.add_service(svc);
        }
        "mesh-server" => {
            let mut tls = TlsSettings::intermediate(args.need("cert"), args.need("key"))
                .unwrap_or_else(|e| usage(&format!("TLS settings: {e}")));
            tls.enable_h2();
            let mut svc = http_proxy_service(
                &server.configuration,
                ToOrigin {
                    origin: args.addr("origin"),
                },
            );
            svc.add_tls_with_settings(listen, None, tls);
            server.add_service(svc);
        }
        other => usage(&format!("unknown mode {other}")),
    }
    server.run_forever();
}
