//! Discovery sources: where this cluster's services and their endpoints come
//! from, besides the `[[services]]` of the configuration.
//!
//! Each source is a long-running task that hands its whole view to a
//! [`Publish`] sink (the [`Hub`](crate::peering::Hub)) under a name of its own,
//! `<kind>:<id>`, whenever that view changes:
//!
//! - [`file`]: a TOML file of `[[services]]` tables, re-read when it changes
//!   (the parsing lives in the gateway crate, with the rest of the
//!   configuration; this module has the file watcher);
//! - [`dns`]: SRV or A/AAAA records through `hickory-resolver`, re-resolved
//!   when their TTL runs out;
//! - [`kubernetes`]: `Service`s, `EndpointSlice`s and MCS `ServiceExport`s
//!   watched through `kube-rs`.
//!
//! The rule every source follows: *broken input never loses what was known*.
//! A file that does not parse, a resolver that times out, an API server that
//! refuses a watch — each is logged with what went wrong, counted in
//! `isthmus_discovery_errors_total{source,kind}`, and the source's last good
//! view stays published until a good one replaces it.

pub mod dns;
pub mod file;
pub mod kubernetes;
mod metrics;

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

pub use metrics::{DiscoveryMetrics, FailureKind};

use crate::catalog::LocalService;
use crate::peering::Hub;

/// Where a source's view goes.
pub trait Publish: Send + Sync {
    /// Replaces everything `source` found with `services`.
    fn publish(&self, source: &str, services: Vec<LocalService>);
}

impl Publish for Hub {
    fn publish(&self, source: &str, services: Vec<LocalService>) {
        self.set_source(source, services);
    }
}

/// One source's connection to the sink and its metrics: publishes a view only
/// when it differs from the last one, and keeps the counts up to date.
pub struct SourceHandle {
    name: String,
    sink: Arc<dyn Publish>,
    metrics: DiscoveryMetrics,
    last: Option<Vec<LocalService>>,
}

impl SourceHandle {
    /// A handle for the source `name` (`<kind>:<id>`).
    pub fn new(name: impl Into<String>, sink: Arc<dyn Publish>, metrics: DiscoveryMetrics) -> Self {
        Self {
            name: name.into(),
            sink,
            metrics,
            last: None,
        }
    }

    /// The source's name, `<kind>:<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Publishes `services` unless they are what was published last; true if
    /// they were published. Order does not matter: services are sorted by
    /// key and endpoints by address first.
    pub fn publish(&mut self, mut services: Vec<LocalService>) -> bool {
        for s in &mut services {
            s.endpoints.sort();
            s.endpoints.dedup();
            s.export.endpoints.sort();
            s.export.endpoints.dedup();
        }
        services.sort_by(|a, b| a.export.key.cmp(&b.export.key));
        if self.last.as_ref() == Some(&services) {
            return false;
        }
        let endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
        info!(
            source = %self.name,
            services = services.len(),
            endpoints,
            "discovery source updated"
        );
        self.metrics
            .services
            .with_label_values(&[&self.name])
            .set(i64::try_from(services.len()).unwrap_or(i64::MAX));
        self.metrics
            .endpoints
            .with_label_values(&[&self.name])
            .set(i64::try_from(endpoints).unwrap_or(i64::MAX));
        self.metrics.updates.with_label_values(&[&self.name]).inc();
        self.sink.publish(&self.name, services.clone());
        self.last = Some(services);
        true
    }

    /// Counts an input the source could not use (the caller logs it); the
    /// last good view stays published.
    pub fn failed(&self, kind: FailureKind) {
        self.metrics
            .errors
            .with_label_values(&[&self.name, kind.label()])
            .inc();
    }

    /// Whether the source has published a view yet.
    pub fn has_published(&self) -> bool {
        self.last.is_some()
    }

    /// Removes the source's services: it was taken out of the configuration.
    pub fn withdraw(&mut self) {
        self.sink.publish(&self.name, Vec::new());
        self.metrics
            .services
            .with_label_values(&[&self.name])
            .set(0);
        self.metrics
            .endpoints
            .with_label_values(&[&self.name])
            .set(0);
        self.last = None;
    }
}

/// Exponential backoff for retrying broken inputs: `min`, doubling, at most
/// `max`; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `min`, never waits longer than `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The wait before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to the shortest wait.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let waits: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }
}

/// A sink that hands every publication to the test.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::Publish;
    use crate::catalog::LocalService;

    /// What a source published, in order.
    pub(crate) struct Published(mpsc::UnboundedReceiver<(String, Vec<LocalService>)>);

    impl Published {
        /// The next publication (fails the test after 10 s).
        pub(crate) async fn next(&mut self) -> (String, Vec<LocalService>) {
            tokio::time::timeout(Duration::from_secs(10), self.0.recv())
                .await
                .expect("a publication within 10 s")
                .expect("the source is running")
        }

        /// Fails if anything is published within `d`.
        pub(crate) async fn assert_quiet(&mut self, d: Duration) {
            if let Ok(Some(p)) = tokio::time::timeout(d, self.0.recv()).await {
                panic!("unexpected publication: {p:?}");
            }
        }
    }

    struct Sink(mpsc::UnboundedSender<(String, Vec<LocalService>)>);

    impl Publish for Sink {
        fn publish(&self, source: &str, services: Vec<LocalService>) {
            let _ = self.0.send((source.to_owned(), services));
        }
    }

    /// A sink, and what it receives.
    pub(crate) fn sink() -> (Arc<dyn Publish>, Published) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Sink(tx)), Published(rx))
    }
}
