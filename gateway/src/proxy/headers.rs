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

/// A request's W3C trace context: adopted from a valid `traceparent`, or a
/// new trace started here. Kept as the hex the header carries (no allocation).
#[derive(Clone, Copy)]
pub(crate) struct TraceContext {
    trace_id: [u8; 32],
    parent_id: [u8; 16],
    sampled: bool,
    /// Whether it came from the request (its parent id is the caller's span).
    pub(crate) adopted: bool,
}

impl TraceContext {
    /// No trace yet (the request was not routed).
    pub(crate) const UNSET: Self = Self {
        trace_id: [b'0'; 32],
        parent_id: [b'0'; 16],
        sampled: false,
        adopted: false,
    };

    /// The context of a valid `traceparent`.
    pub(crate) fn parse(traceparent: &str) -> Option<Self> {
        let trace = trace_id(traceparent)?.as_bytes();
        let rest = &traceparent.as_bytes()[36..];
        let flags = u8::from_str_radix(traceparent.get(53..55)?, 16).ok()?;
        Some(Self {
            trace_id: trace.try_into().ok()?,
            parent_id: rest.get(..16)?.try_into().ok()?,
            sampled: flags & 1 == 1,
            adopted: true,
        })
    }

    /// A new trace, with a random parent id for the next hop when no span
    /// of this gateway takes its place.
    pub(crate) fn root() -> Self {
        let mut ctx = Self::UNSET;
        fill_random_hex(&mut ctx.trace_id);
        fill_random_hex(&mut ctx.parent_id);
        ctx.sampled = true;
        ctx
    }

    pub(crate) fn is_set(&self) -> bool {
        self.trace_id != Self::UNSET.trace_id
    }

    /// The trace id, 32 lowercase hex digits (zeros when unset).
    pub(crate) fn trace_id(&self) -> &str {
        ascii(&self.trace_id)
    }

    /// The trace id's low 64 bits: what the ratio sampler compares.
    pub(crate) fn low_bits(&self) -> u64 {
        u64::from_str_radix(ascii(&self.trace_id[16..]), 16).unwrap_or(0)
    }

    /// The sampled flag.
    pub(crate) fn sampled(&self) -> bool {
        self.sampled
    }

    pub(crate) fn set_sampled(&mut self, sampled: bool) {
        self.sampled = sampled;
    }

    /// The trace id as bytes (for spans).
    pub(crate) fn trace_id_bytes(&self) -> Vec<u8> {
        hex_bytes(&self.trace_id)
    }

    /// The caller's span id as bytes, when adopted (for spans).
    pub(crate) fn parent_id_bytes(&self) -> Vec<u8> {
        if self.adopted {
            hex_bytes(&self.parent_id)
        } else {
            Vec::new()
        }
    }

    /// The `traceparent` sent upstream: this context's own parent id, or
    /// `span` (a span of this gateway, which is then sampled).
    pub(crate) fn traceparent(&self, span: Option<u64>) -> String {
        let mut tp = *b"00-________________________________-________________-00";
        tp[3..35].copy_from_slice(&self.trace_id);
        match span {
            Some(id) => {
                hex_into(&mut tp[36..52], &id.to_be_bytes());
                tp[54] = b'1';
            }
            None => {
                tp[36..52].copy_from_slice(&self.parent_id);
                if self.sampled {
                    tp[54] = b'1';
                }
            }
        }
        ascii(&tp).to_owned()
    }
}

/// A new span id: 64 random bits, never zero.
pub(crate) fn new_span_id() -> u64 {
    next_u64().max(1)
}

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

fn hex_bytes(hex: &[u8]) -> Vec<u8> {
    hex.chunks_exact(2)
        .map(|pair| u8::from_str_radix(ascii(pair), 16).unwrap_or(0))
        .collect()
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
        let fresh = TraceContext::root().traceparent(None);
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

    #[test]
    fn trace_contexts_carry_the_callers_ids_or_this_gateways_span() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(tp).unwrap();
        assert!(ctx.adopted && ctx.sampled() && ctx.is_set());
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.traceparent(None), tp);
        assert_eq!(
            ctx.parent_id_bytes(),
            [0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(ctx.low_bits(), 0xa3ce_929d_0e0e_4736);
        assert_eq!(
            ctx.traceparent(Some(0x0102_0304_0506_0708)),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
        let unsampled = TraceContext::parse(&tp.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
        let mut root = TraceContext::root();
        assert!(!root.adopted && root.parent_id_bytes().is_empty());
        root.set_sampled(false);
        let sent = root.traceparent(None);
        assert!(
            sent.ends_with("-00") && trace_id(&sent) == Some(root.trace_id()),
            "{sent}"
        );
        assert!(!TraceContext::UNSET.is_set());
        assert_ne!(new_span_id(), 0);
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
            let tp = TraceContext::root().traceparent(None);
            STATE.with(|s| s.set(seed));
            assert_eq!(id, formatted_hex(16));
            let expected = format!("00-{}-{}-01", formatted_hex(16), formatted_hex(8));
            assert_eq!(tp, expected);
            assert_eq!(tp.len(), 55);
            assert_eq!(trace_id(&tp), Some(&tp[3..35]));
        }
    }
}
