//! Peering messages come from peer gateways: any bytes decode to a message or
//! an error, every conversion of it yields a value or a named error, never a
//! panic, and whatever is accepted survives its own conversion back unchanged.
#![no_main]

use isthmus_federation::peering::PeeringLimits;
use isthmus_federation::peering::convert::{
    PeerHello, export_to_proto, exports_from_proto, service_key,
};
use isthmus_federation::peering::proto::{Hello, PeerMessage, peer_message::Kind};
use isthmus_federation::{ClusterName, SpiffeId};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// A hello is checked against the identity its sender proved in the TLS
/// handshake: as that identity (the claimed one, when it parses) an accepted
/// hello round-trips; as anyone else it is refused.
fn check_hello(hello: &Hello) {
    let fixed: SpiffeId = "spiffe://fuzz.example/isthmus/gateway/gw"
        .parse()
        .expect("valid id");
    let claimed = hello.spiffe_id.parse::<SpiffeId>().ok();
    for authenticated in [Some(fixed), claimed].into_iter().flatten() {
        let Ok(checked) = PeerHello::from_proto(hello, &authenticated) else {
            continue;
        };
        assert_eq!(checked.spiffe_id, authenticated);
        assert_eq!(checked.spiffe_id.as_str(), hello.spiffe_id);
        let again = PeerHello::from_proto(&checked.to_proto(), &authenticated).expect("own hello");
        assert_eq!(again, checked);
        let other: SpiffeId = format!("{authenticated}-other").parse().expect("valid id");
        assert!(
            PeerHello::from_proto(hello, &other).is_err(),
            "a hello is accepted only from the identity it names"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = PeerMessage::decode(data) else {
        return;
    };
    let cluster: ClusterName = "fuzz".parse().expect("valid cluster");
    let limits = PeeringLimits::default();
    let (services, field) = match message.kind {
        Some(Kind::Hello(hello)) => {
            check_hello(&hello);
            return;
        }
        Some(Kind::Snapshot(s)) => (s.services, "services"),
        Some(Kind::Delta(d)) => {
            for r in &d.removals {
                if let Ok(key) = service_key(&r.namespace, &r.name) {
                    assert_eq!(key.to_string(), format!("{}/{}", r.namespace, r.name));
                }
            }
            (d.upserts, "upserts")
        }
        _ => return,
    };
    let (good, bad) = exports_from_proto(&services, field, &cluster, &limits);
    assert_eq!(good.len() + bad.len(), services.len());
    for e in &bad {
        assert!(e.path.starts_with(field), "{e}");
    }
    for export in good {
        let wire = export_to_proto(&export, &cluster);
        let (again, none) = exports_from_proto(&[wire], field, &cluster, &limits);
        assert!(none.is_empty(), "{none:?}");
        assert_eq!(again, [export]);
    }
});
