//! Passive outlier detection for one backend: a pure state machine over
//! outcomes and instants, so it is tested without sockets or sleeping.

use std::time::{Duration, Instant};

use crate::config::upstream::OutlierDetectionConfig;

/// What happened to one request or connection sent to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500, or an L4 connection established.
    Success,
    /// A 5xx response, a connect failure, a reset or a timeout.
    Failure,
}

/// The outlier state of one backend.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive_failures: u32,
    /// Ejections so far; the next lasts `base * 2^ejections` (capped).
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Outlier {
    /// Whether the backend is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Ends the current ejection at once (the backend proved it is back some
    /// other way); the backoff of later ejections is kept.
    pub fn forgive(&mut self) {
        self.ejected_until = None;
        self.consecutive_failures = 0;
    }

    /// When the current ejection ends.
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// Records `outcome`. Returns the ejection's length when this outcome
    /// ejects the backend; `may_eject` says whether the service can spare it.
    pub fn record(
        &mut self,
        outcome: Outcome,
        now: Instant,
        policy: &OutlierDetectionConfig,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        if let Some(until) = self.ejected_until
            && now >= until
        {
            // Back in service. A backend that stayed healthy for the longest
            // ejection since it returned starts its backoff over.
            self.ejected_until = None;
            if now.duration_since(until) >= policy.max_ejection_time {
                self.ejections = 0;
            }
        }
        match outcome {
            Outcome::Success => {
                self.consecutive_failures = 0;
                None
            }
            Outcome::Failure => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let threshold = policy.consecutive_failures;
                if threshold == 0
                    || self.consecutive_failures < threshold
                    || self.is_ejected(now)
                    || !may_eject()
                {
                    return None;
                }
                let length = policy
                    .base_ejection_time
                    .saturating_mul(1u32 << self.ejections.min(20))
                    .min(policy.max_ejection_time);
                self.ejections = self.ejections.saturating_add(1);
                self.consecutive_failures = 0;
                self.ejected_until = Some(now + length);
                Some(length)
            }
        }
    }
}

/// Whether one more of `total` backends may be ejected while `ejected` are:
/// at most `percent` of them, but one always may (else a single bad backend of
/// a small service could never be avoided).
pub fn may_eject_another(ejected: usize, total: usize, percent: u32) -> bool {
    ejected == 0 || (ejected + 1) * 100 <= total * percent as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierDetectionConfig {
        OutlierDetectionConfig {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(35),
            max_ejection_percent: 50,
        }
    }

    fn fail(o: &mut Outlier, now: Instant) -> Option<Duration> {
        o.record(Outcome::Failure, now, &policy(), || true)
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let t = Instant::now();
        let mut o = Outlier::default();
        assert_eq!(fail(&mut o, t), None);
        assert_eq!(fail(&mut o, t), None);
        o.record(Outcome::Success, t, &policy(), || true);
        assert_eq!(fail(&mut o, t), None);
        assert_eq!(fail(&mut o, t), None);
        assert_eq!(fail(&mut o, t), Some(Duration::from_secs(10)));
        assert!(o.is_ejected(t + Duration::from_secs(9)));
        assert!(
            !o.is_ejected(t + Duration::from_secs(10)),
            "returns by itself"
        );
    }

    #[test]
    fn ejections_double_up_to_the_maximum_and_reset_after_a_quiet_spell() {
        let mut t = Instant::now();
        let mut o = Outlier::default();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            let length = (0..3).find_map(|_| fail(&mut o, t)).expect("ejected");
            lengths.push(length.as_secs());
            t += length; // back in service, fails again at once
        }
        assert_eq!(lengths, [10, 20, 35, 35]);
        // Healthy for the longest ejection since returning: backoff starts over.
        o.record(
            Outcome::Success,
            t + Duration::from_secs(35),
            &policy(),
            || true,
        );
        t += Duration::from_secs(36);
        let length = (0..3).find_map(|_| fail(&mut o, t)).expect("ejected");
        assert_eq!(length.as_secs(), 10);
    }

    #[test]
    fn no_ejection_when_the_service_cannot_spare_it_or_detection_is_off() {
        let t = Instant::now();
        let mut o = Outlier::default();
        for _ in 0..10 {
            assert_eq!(o.record(Outcome::Failure, t, &policy(), || false), None);
        }
        assert!(!o.is_ejected(t));
        let off = OutlierDetectionConfig {
            consecutive_failures: 0,
            ..policy()
        };
        for _ in 0..10 {
            assert_eq!(o.record(Outcome::Failure, t, &off, || true), None);
        }
    }

    #[test]
    fn ejection_percent_always_allows_one() {
        assert!(may_eject_another(0, 1, 0));
        assert!(!may_eject_another(1, 2, 50));
        assert!(may_eject_another(1, 4, 50));
        assert!(!may_eject_another(2, 4, 50));
        assert!(may_eject_another(3, 4, 100));
    }
}
