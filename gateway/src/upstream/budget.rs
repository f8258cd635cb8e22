//! A retry budget (as in Finagle and Linkerd): retries may add a share of the
//! requests seen over the last ten seconds, plus a floor per second, so that a
//! struggling backend is not buried under retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Length of one accounting window in seconds; the budget spans the current
/// and the previous window.
const WINDOW_SECS: u64 = 10;

/// Requests and retries of one service.
#[derive(Debug)]
pub struct RetryBudget {
    epoch: Instant,
    /// Index of the current window since `epoch`.
    window: AtomicU64,
    requests: [AtomicU64; 2],
    retries: [AtomicU64; 2],
}

impl RetryBudget {
    /// An empty budget.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            window: AtomicU64::new(0),
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    /// The current window's slot, clearing the slot being reused when the
    /// window moved on. Counts racing with the move may land in either window.
    fn slot(&self, now: Instant) -> usize {
        let window = now.duration_since(self.epoch).as_secs() / WINDOW_SECS;
        let seen = self.window.load(Ordering::Relaxed);
        if window != seen
            && self
                .window
                .compare_exchange(seen, window, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let next = (window % 2) as usize;
            self.requests[next].store(0, Ordering::Relaxed);
            self.retries[next].store(0, Ordering::Relaxed);
            if window > seen + 1 {
                // Idle for more than a window: the other slot is stale too.
                self.requests[1 - next].store(0, Ordering::Relaxed);
                self.retries[1 - next].store(0, Ordering::Relaxed);
            }
        }
        (window % 2) as usize
    }

    /// Counts one request.
    pub fn request(&self, now: Instant) {
        self.requests[self.slot(now)].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self, now: Instant, percent: u32, min_per_second: u32) -> bool {
        let slot = self.slot(now);
        let sum = |c: &[AtomicU64; 2]| c[0].load(Ordering::Relaxed) + c[1].load(Ordering::Relaxed);
        let allowed = u64::from(min_per_second) * WINDOW_SECS
            + sum(&self.requests) * u64::from(percent) / 100;
        if sum(&self.retries) >= allowed {
            return false;
        }
        self.retries[slot].fetch_add(1, Ordering::Relaxed);
        true
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Counts `n` requests at `t`.
    fn requests(b: &RetryBudget, t: Instant, n: usize) {
        (0..n).for_each(|_| b.request(t));
    }

    #[test]
    fn retries_are_a_share_of_requests_plus_a_floor() {
        let b = RetryBudget::new();
        let t = b.epoch;
        requests(&b, t, 100);
        // 20% of 100 plus a floor of 1/s over the 10 s window: 30.
        let granted = (0..100).filter(|_| b.try_retry(t, 20, 1)).count();
        assert_eq!(granted, 30);
        // Ten more requests buy two more retries.
        requests(&b, t, 10);
        assert_eq!((0..10).filter(|_| b.try_retry(t, 20, 1)).count(), 2);
    }

    #[test]
    fn old_windows_stop_counting() {
        let b = RetryBudget::new();
        let t = b.epoch;
        requests(&b, t, 10);
        assert_eq!((0..10).filter(|_| b.try_retry(t, 0, 1)).count(), 10);
        assert!(!b.try_retry(t, 0, 1));
        // The next window still sees the previous one; the one after does not.
        assert!(!b.try_retry(t + Duration::from_secs(10), 0, 1));
        assert!(b.try_retry(t + Duration::from_secs(25), 0, 1));
        assert!(!b.try_retry(t + Duration::from_secs(100), 0, 0));
    }
}
