//! Peering messages come from peer gateways: any bytes decode to a message or
//! an error, every conversion of it yields a value or a named error, never a
//! panic, and whatever is accepted survives its own conversion back unchanged.
#![no_main]

use isthmus_federation::peering::PeeringLimits;
use isthmus_federation::peering::convert::{PeerHello, export_to_proto, exports_from_proto};
use isthmus_federation::peering::proto::{PeerMessage, peer_message::Kind};
use isthmus_federation::{ClusterName, SpiffeId};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = PeerMessage::decode(data) else {
        return;
    };
    let cluster: ClusterName = "fuzz".parse().expect("valid cluster");
    let limits = PeeringLimits::default();
    let services = match message.kind {
        Some(Kind::Hello(hello)) => {
            let id: SpiffeId = "spiffe://fuzz.example/isthmus/gateway/gw"
                .parse()
                .expect("valid id");
            if let Ok(checked) = PeerHello::from_proto(&hello, &id) {
                let again = PeerHello::from_proto(&checked.to_proto(), &id).expect("own hello");
                assert_eq!(again, checked);
            }
            return;
        }
        Some(Kind::Snapshot(s)) => s.services,
        Some(Kind::Delta(d)) => d.upserts,
        _ => return,
    };
    let (good, bad) = exports_from_proto(&services, "services", &cluster, &limits);
    assert_eq!(good.len() + bad.len(), services.len());
    for export in good {
        let wire = export_to_proto(&export, &cluster);
        let (again, none) = exports_from_proto(&[wire], "services", &cluster, &limits);
        assert!(none.is_empty());
        assert_eq!(again, [export]);
    }
});
