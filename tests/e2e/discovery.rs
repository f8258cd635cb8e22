//! Discovery end to end: a gateway whose services come from a watched file
//! follows edits of that file (editor-style atomic saves), keeps serving the
//! last good services when an edit is broken, and answers for them in DNS.
//! (DNS and Kubernetes discovery are tested in `isthmus-federation` against a
//! real hickory DNS server and recorded API responses.)

use std::time::Duration;

use anyhow::Result;
use isthmus_tests::dns::dig;
use isthmus_tests::{
    EchoServer, Gateway, curl, free_addr, metric_value, minimal_config, replace_file, wait_for,
};

fn services(endpoint: std::net::SocketAddr) -> String {
    format!(
        "[[services]]\nnamespace = \"shop\"\nname = \"web\"\nports = [{{ port = 8080, name = \"http\" }}]\nendpoints = [\"{endpoint}\"]\nexport = true\n"
    )
}

#[test]
fn a_watched_file_drives_the_catalog_and_a_broken_edit_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("web.toml");
    let blue = EchoServer::start("blue");
    let green = EchoServer::start("green");
    std::fs::write(&file, services(blue.addr))?;
    let (admin, outbound, dns) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        "{}[listeners]\noutbound = \"{outbound}\"\n[dns]\nlisten = \"{dns}\"\nclusterset_ipv4_range = \"127.244.0.0/16\"\n[discovery]\nfiles = [\"{file}\"]\n",
        minimal_config("gw-files", admin),
        file = file.display()
    );
    let mut gw = Gateway::start(&config, admin, &[])?;
    gw.wait_ready(Duration::from_secs(20))?;
    let url = format!("http://{outbound}/");
    let host = ["-H", "Host: web.shop.svc.clusterset.local:8080"];
    let get = || curl(&[host[0], host[1], url.as_str()]);
    let first = wait_for(Duration::from_secs(5), "shop/web from the file", || {
        let r = get();
        (r.status == 200).then_some(r)
    })?;
    assert!(first.body.contains("blue"), "{}", first.body);
    assert_eq!(
        dig(dns, &["web.shop.svc.clusterset.local", "A"]).status,
        "NOERROR"
    );

    // An editor-style save (write elsewhere, rename over): picked up.
    replace_file(&file, services(green.addr).as_bytes());
    wait_for(Duration::from_secs(5), "the new endpoint", || {
        get().body.contains("green").then_some(())
    })?;

    // A broken edit: logged and counted, the last good services stay.
    replace_file(
        &file,
        b"[[services]]\nnamespace = \"shop\"\nname = \"web\"\nports = []\n",
    );
    let source = format!("file:{}", file.display());
    wait_for(Duration::from_secs(5), "the invalid edit counted", || {
        let metrics = gw.admin_get("/metrics").body;
        let series =
            format!("isthmus_discovery_errors_total{{kind=\"invalid\",source=\"{source}\"}}");
        (metric_value(&metrics, &series)? >= 1.0).then_some(())
    })?;
    let still = get();
    assert_eq!(still.status, 200, "{still:?}");
    assert!(still.body.contains("green"), "{}", still.body);
    assert!(
        gw.log().contains("services[0].ports"),
        "the problem is logged with its path"
    );

    // Emptied: the service is withdrawn.
    replace_file(&file, b"");
    wait_for(Duration::from_secs(5), "withdrawn", || {
        (get().status == 404).then_some(())
    })?;
    Ok(())
}
