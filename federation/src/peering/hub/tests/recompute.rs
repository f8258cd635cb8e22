//! This cluster's export times across restarts.

use super::*;

#[test]
fn own_export_times_survive_a_restart_through_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let local = local("shop/web", ([127, 0, 0, 20], 8080).into(), 0);
    let start = |path: &std::path::Path| {
        let hub = hub(PeeringLimits::default(), Some(path.to_owned()));
        hub.set_source("config", vec![local.clone()]);
        hub.exports().borrow().services[&"shop/web".parse::<ServiceKey>().unwrap()]
            .export_time_millis
    };
    let first = start(&path);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(
        start(&path),
        first,
        "the restarted gateway keeps its export time"
    );
}
