//! Liveness, readiness and draining.
//!
//! [`Readiness`] is a set of named conditions (`config`, `listeners`, `signals`,
//! and later `peers`...). The process is ready when every registered condition
//! holds and it is not draining; `/readyz` reports each condition so an operator
//! sees *why* a gateway is not ready. [`Drain`] counts in-flight work so a
//! graceful stop waits exactly as long as it must, not a fixed grace period.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

/// One readiness condition's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// Whether the condition holds.
    pub ok: bool,
    /// Why it does or does not, for people.
    pub detail: String,
}

/// Readiness of the process, shared by everything that contributes to it.
#[derive(Debug, Default)]
pub struct Readiness {
    conditions: Mutex<BTreeMap<&'static str, Condition>>,
    draining: AtomicBool,
    changed: Notify,
}

/// What `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadinessReport {
    /// Every condition holds and the process is not draining.
    pub ready: bool,
    /// The process is stopping and refuses new work.
    pub draining: bool,
    /// Each condition by name.
    pub conditions: BTreeMap<&'static str, Condition>,
}

impl Readiness {
    /// Registers (or updates) condition `name`.
    pub fn set(&self, name: &'static str, ok: bool, detail: impl Into<String>) {
        let mut conditions = self.conditions.lock();
        conditions.insert(
            name,
            Condition {
                ok,
                detail: detail.into(),
            },
        );
        drop(conditions);
        self.changed.notify_waiters();
    }

    /// Marks the process as draining: it stays alive but is no longer ready.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Whether the process is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The current state of every condition.
    pub fn report(&self) -> ReadinessReport {
        let conditions = self.conditions.lock().clone();
        let draining = self.is_draining();
        ReadinessReport {
            ready: !draining && !conditions.is_empty() && conditions.values().all(|c| c.ok),
            draining,
            conditions,
        }
    }

    /// Waits until every condition holds (and at least one is registered).
    pub async fn wait_ready(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.report().ready {
                return;
            }
            changed.await;
        }
    }
}

/// Counts in-flight work (requests, connections) so shutdown can wait for it.
#[derive(Debug, Default)]
pub struct Drain {
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Held while one unit of work is in flight.
#[derive(Debug)]
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Starts tracking one unit of work until the guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Work in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight or `timeout` passes; returns what is left.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.in_flight() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_holds_and_not_draining() {
        let r = Readiness::default();
        assert!(!r.report().ready, "no condition registered yet");
        r.set("config", true, "loaded");
        r.set("listeners", false, "binding");
        assert!(!r.report().ready);
        r.set("listeners", true, "bound");
        assert!(r.report().ready);
        r.start_draining();
        let report = r.report();
        assert!(!report.ready && report.draining);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_ready_wakes_on_last_condition() {
        let r = Arc::new(Readiness::default());
        r.set("a", false, "");
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_ready().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        r.set("a", true, "");
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("no panic");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_in_flight_work_but_not_past_the_timeout() {
        let drain = Arc::new(Drain::default());
        assert_eq!(drain.wait_idle(Duration::from_secs(5)).await, 0);

        let guard = drain.track();
        let d = drain.clone();
        let start = tokio::time::Instant::now();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(guard);
        });
        assert_eq!(d.wait_idle(Duration::from_secs(10)).await, 0);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        release.await.unwrap();

        let _stuck = drain.track();
        assert_eq!(drain.wait_idle(Duration::from_secs(3)).await, 1);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
