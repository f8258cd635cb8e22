use std::time::Duration;

use isthmus_federation::catalog::LocalService;
use tokio::sync::mpsc;

use super::*;

type Publication = (String, Vec<LocalService>);

struct Sink(mpsc::UnboundedSender<Publication>);

impl Publish for Sink {
    fn publish(&self, source: &str, services: Vec<LocalService>) {
        let _ = self.0.send((source.to_owned(), services));
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Publication>) -> Publication {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a publication within 10 s")
        .expect("running")
}

async fn quiet(rx: &mut mpsc::UnboundedReceiver<Publication>, d: Duration) {
    if let Ok(Some(p)) = tokio::time::timeout(d, rx.recv()).await {
        panic!("unexpected publication {p:?}");
    }
}

fn service(name: &str, endpoint: &str) -> String {
    format!(
        "[[services]]\nnamespace = \"payments\"\nname = \"{name}\"\nports = [{{ port = 8080 }}]\nendpoints = [\"{endpoint}\"]\nexport = true\n"
    )
}

use crate::config::test_config as config;

#[tokio::test]
async fn a_watched_file_follows_edits_and_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    std::fs::write(&path, service("ledger", "127.0.0.1:9001")).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let registry = prometheus::Registry::new();
    let metrics = DiscoveryMetrics::new(&registry).unwrap();
    let name = format!("file:{}", path.display());
    let handle = SourceHandle::new(&name, Arc::new(Sink(tx)), metrics.clone());
    let (reread_tx, reread) = watch::channel(0);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run_file(
        path.clone(),
        "east".parse().unwrap(),
        handle,
        reread,
        stop,
    ));

    let (source, view) = next(&mut rx).await;
    assert_eq!(source, name);
    assert_eq!(view[0].endpoints, ["127.0.0.1:9001".parse().unwrap()]);

    // An editor's atomic save with a new endpoint.
    let tmp = dir.path().join(".services.toml.tmp");
    std::fs::write(&tmp, service("ledger", "127.0.0.1:9002")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let (_, view) = next(&mut rx).await;
    assert_eq!(view[0].endpoints, ["127.0.0.1:9002".parse().unwrap()]);

    // A bad edit: nothing published, counted, the previous services stay.
    std::fs::write(
        &path,
        format!(
            "{}{}",
            service("ledger", "127.0.0.1:9003"),
            service("audit", "nowhere")
        ),
    )
    .unwrap();
    let invalid = || metrics.errors.with_label_values(&[&name, "invalid"]).get();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while invalid() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad edit was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    quiet(&mut rx, Duration::from_millis(400)).await;
    assert_eq!(metrics.services.with_label_values(&[&name]).get(), 1);

    // SIGHUP with the same bad content: still rejected once, nothing new.
    reread_tx.send_modify(|n| *n += 1);
    quiet(&mut rx, Duration::from_millis(400)).await;
    assert_eq!(invalid(), 1);

    // Fixed: both services.
    std::fs::write(
        &path,
        format!(
            "{}{}",
            service("ledger", "127.0.0.1:9003"),
            service("audit", "127.0.0.1:9004")
        ),
    )
    .unwrap();
    let (_, view) = next(&mut rx).await;
    assert_eq!(view.len(), 2);
    stop_tx.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn sources_start_and_stop_with_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    std::fs::write(&path, service("ledger", "127.0.0.1:9001")).unwrap();
    let with_file = config(&format!(
        "[discovery]\nfiles = [{:?}]\n",
        path.display().to_string()
    ));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let registry = prometheus::Registry::new();
    let (handle, runner) = discovery(&with_file, Arc::new(Sink(tx)), &registry).unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(async move { runner.run(stop).await });

    let (source, view) = next(&mut rx).await;
    assert_eq!(source, format!("file:{}", path.display()));
    assert_eq!(view.len(), 1);

    // Reloaded without the file: its services are withdrawn.
    handle.apply(&config(""));
    let (source, view) = next(&mut rx).await;
    assert_eq!(source, format!("file:{}", path.display()));
    assert!(view.is_empty());
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(text.contains("isthmus_discovery_updates_total"), "{text}");

    stop_tx.send_replace(true);
    task.await.unwrap();
}
