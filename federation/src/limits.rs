//! Caps on what outside parties can make the gateway hold open.
//!
//! Every listener that accepts connections from outside (outbound, east-west,
//! federation, DNS over TCP, admin, the bundle endpoint) admits a connection
//! only while it holds a [`ConnectionPermit`] from its [`ConnectionLimiter`]:
//! at most `total` connections at once, and at most `per_source` from one
//! source. A source is one IPv4 address or one IPv6 /64 (what one host or
//! one customer is usually given), so an attacker cannot dodge the per-source
//! cap by cycling addresses inside its own prefix. Over either cap the caller
//! refuses the connection at once (and counts it): it never waits, so a flood
//! from one source never stalls anyone else.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once, from everyone.
    pub total: usize,
    /// Connections open at once from one source (IPv4 address or IPv6 /64).
    pub per_source: usize,
}

crate::label_enum! {
    /// Why a connection was refused. Each listener's refusal metric names these
    /// in its own words (see `docs/metrics.md`); [`Refused::label`] is the
    /// plain one.
    pub enum Refused {
        /// The listener holds `total` connections already.
        Total => "total",
        /// The source holds `per_source` connections already.
        PerSource => "per_source",
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Total => "too many connections in total",
            Self::PerSource => "too many connections from this source",
        })
    }
}

/// Which source a connection counts against: an IPv4 address (IPv4-mapped
/// IPv6 included), or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<SourceKey, usize>,
}

/// Counts the connections a listener holds and admits new ones within its
/// [`ConnectionLimits`].
#[derive(Debug)]
pub struct ConnectionLimiter {
    limits: ConnectionLimits,
    open: Mutex<Open>,
}

impl ConnectionLimiter {
    /// A limiter with `limits`.
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::new(Open::default()),
        })
    }

    /// Its limits.
    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Admits a connection from `source`, or says why not. The connection
    /// counts until the permit is dropped.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Result<ConnectionPermit, Refused> {
        let key = SourceKey::of(source);
        let mut open = self.open.lock();
        if open.total >= self.limits.total {
            return Err(Refused::Total);
        }
        let from_source = open.by_source.entry(key).or_default();
        if *from_source >= self.limits.per_source {
            return Err(Refused::PerSource);
        }
        *from_source += 1;
        open.total += 1;
        Ok(ConnectionPermit {
            limiter: self.clone(),
            key,
        })
    }

    /// Connections open now.
    pub fn open_total(&self) -> usize {
        self.open.lock().total
    }

    /// Connections open now from `source`'s key.
    pub fn open_from(&self, source: IpAddr) -> usize {
        self.open
            .lock()
            .by_source
            .get(&SourceKey::of(source))
            .copied()
            .unwrap_or(0)
    }

    fn release(&self, key: SourceKey) {
        let mut open = self.open.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                // Sources come and go: keep no entry for one with nothing open.
                open.by_source.remove(&key);
            }
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    key: SourceKey,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limiter.release(self.key);
    }
}

/// Lets one log line through per interval and counts the ones held back: for
/// what an attacker can trigger in bulk (refused connections, bad
/// certificates), so that the journal cannot be flooded; the metrics count
/// every one.
#[derive(Debug)]
pub struct LogLimit {
    start: Instant,
    interval: Duration,
    /// Milliseconds since `start` before which nothing more is let through.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            start: Instant::now(),
            interval,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` if this line may go out.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        if now < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(interval),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_source_and_in_total_and_frees_on_drop() {
        let limiter = ConnectionLimiter::new(ConnectionLimits {
            total: 3,
            per_source: 2,
        });
        let a1 = limiter.try_acquire(ip("127.0.0.1")).unwrap();
        let _a2 = limiter.try_acquire(ip("127.0.0.1")).unwrap();
        assert_eq!(
            limiter.try_acquire(ip("127.0.0.1")).unwrap_err(),
            Refused::PerSource
        );
        let _b1 = limiter.try_acquire(ip("127.0.0.2")).unwrap();
        assert_eq!(
            limiter.try_acquire(ip("127.0.0.3")).unwrap_err(),
            Refused::Total
        );
        assert_eq!(limiter.open_total(), 3);
        drop(a1);
        assert_eq!(limiter.open_from(ip("127.0.0.1")), 1);
        let _a3 = limiter.try_acquire(ip("127.0.0.1")).unwrap();
        assert_eq!(limiter.open_total(), 3);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            SourceKey::of(ip("2001:db8:1:2::1")),
            SourceKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            SourceKey::of(ip("2001:db8:1:2::1")),
            SourceKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            SourceKey::of(ip("::ffff:127.0.0.1")),
            SourceKey::of(ip("127.0.0.1"))
        );
        let limiter = ConnectionLimiter::new(ConnectionLimits {
            total: 10,
            per_source: 1,
        });
        let _p = limiter.try_acquire(ip("2001:db8::1")).unwrap();
        assert!(limiter.try_acquire(ip("2001:db8::2")).is_err());
    }

    #[test]
    fn no_entry_is_kept_for_a_source_with_nothing_open() {
        let limiter = ConnectionLimiter::new(ConnectionLimits {
            total: 10,
            per_source: 10,
        });
        for i in 0..100u8 {
            drop(limiter.try_acquire(IpAddr::from([10, 0, 0, i])).unwrap());
        }
        assert!(limiter.open.lock().by_source.is_empty());
    }

    #[test]
    fn the_log_limit_lets_one_through_per_interval_and_counts_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        // As if the interval had passed.
        limit.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limit.allow(), Some(2));
        assert_eq!(limit.allow(), None);
    }
}
