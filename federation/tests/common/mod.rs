//! PKI and trust-store helpers shared by the federation integration tests.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_federation::trust::ca::{self, CaMaterial};
use isthmus_federation::trust::tls::crypto_provider;
use isthmus_federation::trust::{BundleSource, DomainTrust, Svid, TrustBundle, TrustStore};
use isthmus_federation::{SpiffeId, TrustDomain};
use tokio::net::{TcpListener, TcpStream};

pub const HOUR: Duration = Duration::from_secs(3600);

pub fn td(s: &str) -> TrustDomain {
    s.parse().expect("valid trust domain")
}

pub fn id(s: &str) -> SpiffeId {
    s.parse().expect("valid SPIFFE ID")
}

/// Trust for `name` from the concatenated certificates of `cas`.
pub fn domain(name: &str, cas: &[&CaMaterial]) -> DomainTrust {
    let pem: String = cas.iter().map(|c| c.cert_pem.as_str()).collect();
    let bundle = TrustBundle::parse(td(name), pem.as_bytes()).expect("valid bundle");
    DomainTrust::new(
        bundle,
        BundleSource::File(format!("{name}.pem")),
        &crypto_provider(),
    )
    .expect("usable bundle")
}

/// A store with one domain per `(name, ca)`.
pub fn store(cas: &[(&str, &CaMaterial)]) -> TrustStore {
    cas.iter().fold(TrustStore::default(), |store, (name, ca)| {
        store.with(domain(name, &[ca]))
    })
}

/// A valid SVID for `spiffe_id` issued by `ca`.
pub fn svid(ca: &CaMaterial, spiffe_id: &str) -> Svid {
    let issued = ca::issue_svid(ca, &id(spiffe_id), HOUR).expect("issued");
    Svid::from_pem(
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        None,
        &crypto_provider(),
    )
    .expect("valid SVID")
}

/// Accepts TCP connections on a fresh loopback port for the rest of the test,
/// each handed to `handle` in a task of its own; the port's address.
pub async fn serve_tcp<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("a bound address");
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio::spawn(handle(tcp));
        }
    });
    addr
}
