//! The label values the hub's metrics take are the ones their help text
//! (and so `/metrics` and the documentation built from it) promises.

use prometheus::core::Collector;

use super::*;

fn help(metric: &impl Collector) -> String {
    metric.desc()[0].help.clone()
}

/// Whether `help` names `label` as a whole word.
fn names(help: &str, label: &str) -> bool {
    help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| word == label)
}

#[test]
fn every_lease_state_refusal_reason_and_bundle_outcome_is_documented_in_its_metric() {
    let hub = hub_with(&[], &[], PeeringLimits::default());
    let refused = help(&hub.metrics().refused);
    for label in HelloRefusal::ALL
        .map(HelloRefusal::label)
        .into_iter()
        .chain(ExportRefusal::ALL.map(ExportRefusal::label))
    {
        assert!(names(&refused, label), "{label} not in: {refused}");
    }
    let peers = help(&hub.metrics().peers);
    for state in LeaseState::ALL {
        let label = state.label();
        assert!(names(&peers, label), "{label} not in: {peers}");
        // `/debug/peers` names the state as the metric does.
        assert_eq!(serde_json::to_value(state).unwrap(), label);
    }
    let bundles = help(&hub.metrics().bundles);
    for label in BundleOutcome::ALL.map(BundleOutcome::label) {
        assert!(names(&bundles, label), "{label} not in: {bundles}");
    }
}
