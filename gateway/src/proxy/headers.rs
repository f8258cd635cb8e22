//! Request identity headers: `x-request-id` added when absent, W3C `traceparent`
//! propagated or started.

use std::fmt::Write;

use ring::rand::{SecureRandom, SystemRandom};

/// `n` random bytes as lowercase hex.
fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    // The system RNG does not fail on Linux; zeros would only make ids collide.
    let _ = SystemRandom::new().fill(&mut bytes);
    bytes.iter().fold(String::with_capacity(N * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A fresh request id (128 random bits, hex).
pub(crate) fn new_request_id() -> String {
    random_hex::<16>()
}

/// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub(crate) fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some(trace)
}

/// A new `traceparent` starting a sampled trace.
pub(crate) fn new_traceparent() -> String {
    format!("00-{}-{}-01", random_hex::<16>(), random_hex::<8>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_validated_per_w3c() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
        let fresh = new_traceparent();
        assert!(trace_id(&fresh).is_some(), "{fresh}");
        assert_ne!(new_request_id(), new_request_id());
        assert_eq!(new_request_id().len(), 32);
    }
}
