//! Request headers the gateway owns: the internal headers only gateways set
//! (stripped from every client at every entry point), and the request identity
//! headers (`x-request-id` added when absent, W3C `traceparent` propagated or
//! started).

use std::cell::Cell;

use pingora_http::RequestHeader;
use ring::rand::{SecureRandom, SystemRandom};

/// Who called, as the east-west listener saw it on the verified mTLS peer
/// certificate (Envoy's format). Only the east-west listener sets it.
pub(crate) const XFCC: &str = "x-forwarded-client-cert";

/// Names the subset a request is confined to, from a gateway to its peer's
/// east-west listener (which trusts it from authenticated peers only).
pub(crate) const SUBSET: &str = "x-isthmus-subset";

/// Every header whose name starts with this is the gateway's own.
pub(crate) const INTERNAL_PREFIX: &str = "x-isthmus-";

/// Whether `name` (lowercase, as `http` stores names) is a header only
/// gateways may set: `x-forwarded-client-cert` and every `x-isthmus-*`.
pub(crate) fn is_internal(name: &str) -> bool {
    name == XFCC || name.starts_with(INTERNAL_PREFIX)
}

/// Removes every internal header from `req`; returns how many names it removed.
pub(crate) fn strip_internal(req: &mut RequestHeader) -> usize {
    let internal: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|name| is_internal(name.as_str()))
        .cloned()
        .collect();
    for name in &internal {
        req.remove_header(name);
    }
    internal.len()
}

thread_local! {
    /// Per-thread generator state, seeded once from the system RNG. Request and
    /// trace ids need to be unique, not secret: a syscall per id would cost more
    /// than the rest of the id handling.
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // The system RNG does not fail on Linux; fall back to the clock if it did.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = now.to_le_bytes();
    }
    u64::from_le_bytes(bytes)
}

/// The next 64 random bits of this thread (SplitMix64).
fn next_u64() -> u64 {
    STATE.with(|state| {
        let mut z = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Lowercase hex digits, indexed by nibble.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Fills `out` with random lowercase hex: two digits per random byte, the
/// bytes of each 64-bit draw in little-endian order. A table lookup per
/// nibble: ids are made on every request, and `write!` costs more than the
/// randomness.
fn fill_random_hex(out: &mut [u8]) {
    for chunk in out.chunks_mut(16) {
        let word = next_u64().to_le_bytes();
        for (pair, b) in chunk.chunks_exact_mut(2).zip(word) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 0x0f)];
        }
    }
}

/// Only ASCII hex digits and dashes are ever written into these buffers.
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// A fresh request id (128 random bits, hex).
pub(crate) fn new_request_id() -> String {
    let mut id = [0u8; 32];
    fill_random_hex(&mut id);
    ascii(&id).to_owned()
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

/// A new `traceparent` starting a sampled trace:
/// `00-<32 hex trace id>-<16 hex parent id>-01`.
pub(crate) fn new_traceparent() -> String {
    let mut tp = *b"00-________________________________-________________-01";
    fill_random_hex(&mut tp[3..35]);
    fill_random_hex(&mut tp[36..52]);
    ascii(&tp).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_headers_are_stripped_and_others_kept() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in [
            (
                "X-Forwarded-Client-Cert",
                "By=spiffe://evil/x;URI=spiffe://evil/y",
            ),
            ("x-isthmus-subset", "canary"),
            ("X-Isthmus-Anything", "1"),
            ("x-isthmus-subset", "again"),
            ("x-request-id", "keep"),
            ("x-isthmusnot", "keep"),
        ] {
            req.append_header(name, value).unwrap();
        }
        assert_eq!(strip_internal(&mut req), 3);
        let mut left: Vec<&str> = req.headers.keys().map(|n| n.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-isthmusnot", "x-request-id"]);
        assert_eq!(strip_internal(&mut req), 0);
        assert!(is_internal(SUBSET) && is_internal(XFCC));
    }

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
        // Ids do not repeat within a long run, nor across threads.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(new_request_id()));
        }
        let other: Vec<String> =
            std::thread::spawn(|| (0..1000).map(|_| new_request_id()).collect())
                .join()
                .unwrap();
        assert!(other.iter().all(|id| !seen.contains(id)));
    }

    /// The same draws written with `format!`: what the table must reproduce.
    fn formatted_hex(bytes: usize) -> String {
        let mut out = String::new();
        let mut left = bytes;
        while left > 0 {
            for b in &next_u64().to_le_bytes()[..left.min(8)] {
                out.push_str(&format!("{b:02x}"));
            }
            left = left.saturating_sub(8);
        }
        out
    }

    #[test]
    fn ids_are_the_formatted_hex_of_the_same_draws() {
        for seed in [0, 1, 0x0123_4567_89ab_cdef, u64::MAX] {
            STATE.with(|s| s.set(seed));
            let id = new_request_id();
            let tp = new_traceparent();
            STATE.with(|s| s.set(seed));
            assert_eq!(id, formatted_hex(16));
            let expected = format!("00-{}-{}-01", formatted_hex(16), formatted_hex(8));
            assert_eq!(tp, expected);
            assert_eq!(tp.len(), 55);
            assert_eq!(trace_id(&tp), Some(&tp[3..35]));
        }
    }
}
