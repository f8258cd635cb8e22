//! Identity and trust with real processes: PKI from `isthmus ca`, two gateways
//! federating through a SPIFFE bundle endpoint, `openssl s_client` as an outside
//! client, rotation through files, bad files rejected while serving goes on, and
//! our SPIFFE bundles read by an independent JWK implementation (jwcrypto).
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use isthmus_tests::two_clusters::{GW_A, TwoDomains, federated};
use isthmus_tests::{
    DevPki, Gateway, check_config, free_addr, gateway_config, isthmus, metric_value,
    openssl_s_client, python_client, replace_file, wait_for,
};

const START: Duration = Duration::from_secs(20);

fn authorities(debug: &serde_json::Value, td: &str) -> Option<usize> {
    debug["trust_domains"]
        .as_array()?
        .iter()
        .find(|d| d["trust_domain"] == td)
        .and_then(|d| d["authorities"].as_array().map(Vec::len))
}

#[test]
fn federation_through_bundle_endpoints_with_rotation() {
    let TwoDomains {
        pki,
        ca_a,
        ca_b,
        tls_a,
        tls_b,
    } = TwoDomains::new();
    // A's bundle lives in its own file so it can be rotated.
    let bundle_a = pki.path().join("a-bundle.pem");
    std::fs::copy(ca_a.join("bundle.pem"), &bundle_a).unwrap();

    let (admin_a, endpoint_a, admin_b) = (free_addr(), free_addr(), free_addr());
    let config_a = gateway_config(
        "gw-a",
        "a.example",
        admin_a,
        &tls_a,
        &bundle_a,
        &format!(
            "{}[trust.bundle_endpoint]\nlisten = \"{endpoint_a}\"\nrefresh_hint = \"1s\"\n",
            federated("b.example", &ca_b.join("bundle.json"))
        ),
    );
    let config_b = gateway_config(
        "gw-b",
        "b.example",
        admin_b,
        &tls_b,
        &ca_b.join("bundle.pem"),
        &format!(
            "{}endpoint_url = \"https://{endpoint_a}/\"\nendpoint_spiffe_id = \"{GW_A}\"\n",
            federated("a.example", &ca_a.join("bundle.pem"))
        ),
    );
    let mut a = Gateway::start(&config_a, admin_a, &[]).unwrap();
    let mut b = Gateway::start(&config_b, admin_b, &[]).unwrap();
    a.wait_ready(START).unwrap();
    b.wait_ready(START).unwrap();

    // An outside client verifies A's bundle endpoint with A's CA.
    let s_client = openssl_s_client(endpoint_a, &ca_a.join("ca.crt"));
    assert!(
        s_client.contains("Verify return code: 0 (ok)"),
        "{s_client}"
    );
    let debug_a = a.admin_json("/debug/trust");
    assert_eq!(
        debug_a["identity"]["spiffe_id"],
        "spiffe://a.example/isthmus/gateway/gw-a"
    );
    let first_fingerprint = debug_a["identity"]["fingerprint_sha256"].clone();

    // B replaced its bootstrap bundle for a.example with the endpoint's.
    wait_for(
        Duration::from_secs(10),
        "B to fetch a.example's bundle",
        || {
            let debug = b.admin_json("/debug/trust");
            let a_domain = debug["trust_domains"]
                .as_array()?
                .iter()
                .find(|d| d["trust_domain"] == "a.example")?
                .clone();
            a_domain["source"].get("endpoint").map(|_| ())
        },
    )
    .unwrap();

    // Rotate A's root: publish old + new root, then an SVID from the new root.
    let ca_a2 = pki.ca("ca-a2", "a.example");
    let mut both = std::fs::read(ca_a.join("ca.crt")).unwrap();
    both.extend(std::fs::read(ca_a2.join("ca.crt")).unwrap());
    replace_file(&bundle_a, &both);
    wait_for(
        Duration::from_secs(10),
        "A to load the two-root bundle",
        || (authorities(&a.admin_json("/debug/trust"), "a.example") == Some(2)).then_some(()),
    )
    .unwrap();
    // Peers must learn the new root (one refresh hint) before A uses it, or they
    // could not authenticate A any more: B follows through the endpoint.
    wait_for(
        Duration::from_secs(10),
        "B to learn a.example's new root",
        || (authorities(&b.admin_json("/debug/trust"), "a.example") == Some(2)).then_some(()),
    )
    .unwrap();
    let rotated = pki.issue(&ca_a2, "spiffe://a.example/isthmus/gateway/gw-a", "tls-a2");
    replace_file(
        &tls_a.join("svid.key"),
        &std::fs::read(rotated.join("svid.key")).unwrap(),
    );
    replace_file(
        &tls_a.join("svid.crt"),
        &std::fs::read(rotated.join("svid.crt")).unwrap(),
    );
    wait_for(Duration::from_secs(10), "A to present the new SVID", || {
        let fp = a.admin_json("/debug/trust")["identity"]["fingerprint_sha256"].clone();
        (fp != first_fingerprint).then_some(())
    })
    .unwrap();
    // New handshakes carry the new SVID: it verifies with the new root only.
    let s_client = openssl_s_client(endpoint_a, &ca_a2.join("ca.crt"));
    assert!(
        s_client.contains("Verify return code: 0 (ok)"),
        "{s_client}"
    );
    let s_client = openssl_s_client(endpoint_a, &ca_a.join("ca.crt"));
    assert!(
        !s_client.contains("Verify return code: 0 (ok)"),
        "{s_client}"
    );
    // B still authenticates A's endpoint after A's switch: it keeps fetching.
    let fetched = |gw: &Gateway| {
        metric_value(
            &gw.admin_get("/metrics").body,
            "isthmus_trust_bundle_fetches_total{result=\"unchanged\",trust_domain=\"a.example\"}",
        )
        .unwrap_or(0.0)
    };
    let before = fetched(&b);
    wait_for(
        Duration::from_secs(10),
        "B to fetch from the rotated endpoint",
        || (fetched(&b) > before).then_some(()),
    )
    .unwrap();

    // A corrupted bundle file is rejected, logged and counted; nothing changes.
    replace_file(
        &bundle_a,
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    a.wait_log(
        "bundle rejected; the previous bundle stays in use",
        Duration::from_secs(10),
    )
    .unwrap();
    let metrics = a.admin_get("/metrics").body;
    assert!(
        metric_value(&metrics, "isthmus_tls_reload_errors_total{kind=\"bundle\"}") >= Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        authorities(&a.admin_json("/debug/trust"), "a.example"),
        Some(2)
    );
    assert_eq!(a.admin_get("/readyz").status, 200);
    let s_client = openssl_s_client(endpoint_a, &ca_a2.join("ca.crt"));
    assert!(
        s_client.contains("Verify return code: 0 (ok)"),
        "{s_client}"
    );

    // SIGHUP re-reads the files too.
    a.signal("HUP").unwrap();
    a.wait_log("configuration reloaded", Duration::from_secs(5))
        .unwrap();

    for gw in [&mut a, &mut b] {
        gw.signal("TERM").unwrap();
        let (status, _) = gw.wait_exit(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(0));
    }
}

#[test]
fn bad_identity_files_are_configuration_errors() {
    let pki = DevPki::new();
    let ca = pki.ca("ca", "a.example");
    let other_ca = pki.ca("other", "a.example");
    let tls = pki.issue(&ca, "spiffe://a.example/isthmus/gateway/gw-a", "tls");
    let wrong_id = pki.issue(
        &ca,
        "spiffe://a.example/isthmus/gateway/somebody-else",
        "wrong",
    );
    let admin = free_addr();
    let check = |config: &str| check_config(pki.path(), config);
    // gw-a's configuration with the SVID in `tls_dir` and a.example's `bundle`.
    let config = |tls_dir: &Path, bundle: &Path| {
        gateway_config("gw-a", "a.example", admin, tls_dir, bundle, "")
    };
    let good = config(&tls, &ca.join("bundle.pem"));
    assert_eq!(check(&good).0, Some(0), "{}", check(&good).1);

    let (code, err) = check(&good.replace("svid.crt", "missing.crt"));
    assert_eq!(code, Some(78));
    assert!(
        err.contains("identity.cert:") && err.contains("cannot be read"),
        "{err}"
    );

    let (code, err) = check(&config(&wrong_id, &ca.join("bundle.pem")));
    assert_eq!(code, Some(78));
    assert!(
        err.contains("identity.cert:") && err.contains("somebody-else"),
        "{err}"
    );

    let (code, err) = check(&config(&tls, &other_ca.join("bundle.pem")));
    assert_eq!(code, Some(78));
    assert!(
        err.contains("does not validate against the bundle"),
        "{err}"
    );

    // A key that is not the certificate's.
    let mixed = pki.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(tls.join("svid.crt"), mixed.join("svid.crt")).unwrap();
    std::fs::copy(wrong_id.join("svid.key"), mixed.join("svid.key")).unwrap();
    let (code, err) = check(&config(&mixed, &ca.join("bundle.pem")));
    assert_eq!(code, Some(78));
    assert!(
        err.contains("identity.key:") && err.contains("does not match"),
        "{err}"
    );

    // The same problems stop `isthmus run` before it binds anything.
    let file = pki.path().join("run.toml");
    std::fs::write(&file, good.replace("svid.crt", "missing.crt")).unwrap();
    let out = isthmus(&["run", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(78));
    std::net::TcpListener::bind(admin).expect("admin port still free");
}

/// Reads each SPIFFE bundle named in argv[2:] (a file, or an https URL fetched
/// with the chain checked against the CA file argv[1]) with jwcrypto: the whole
/// document as a JWK Set, then each key as a JWK, which checks its members for
/// its `kty` (RFC 7518 §6). Prints, per key, the members as written and the
/// public key jwcrypto made of them, as PEM.
const JWCRYPTO_READ: &str = r#"
import json, ssl, sys, urllib.request
from jwcrypto import jwk
ctx = ssl.create_default_context(cafile=sys.argv[1])
ctx.check_hostname = False  # an SVID names a SPIFFE ID, not a host
out = []
for source in sys.argv[2:]:
    if source.startswith("https://"):
        text = urllib.request.urlopen(source, context=ctx, timeout=10).read().decode()
    else:
        text = open(source).read()
    jwk.JWKSet.from_json(text)
    for raw in json.loads(text)["keys"]:
        key = jwk.JWK(**raw)
        out.append({"source": source, "raw": raw, "pem": key.export_to_pem().decode()})
print(json.dumps(out))
"#;

/// The public key of the certificate `x5c` (standard base64 DER) as openssl
/// reads it, PEM.
fn openssl_public_key(x5c: &str) -> String {
    use std::io::Write;
    let lines: Vec<&str> = x5c
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    );
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The bundles we publish, `isthmus ca init`'s `bundle.json` and the bundle
/// endpoint's document (here with two roots, as during a rotation), are JWK
/// Sets a standard JWK library reads: each `x509-svid` key has `kty` and the
/// members of its key (`crv`, `x`, `y`), exactly one certificate in `x5c` and
/// no `kid`, and the key jwcrypto builds from those members is the one openssl
/// reads from the certificate.
#[test]
fn published_bundles_are_jwk_sets_that_jwcrypto_reads() {
    let pki = DevPki::new();
    let ca = pki.ca("ca", "a.example");
    let ca2 = pki.ca("ca2", "a.example");
    let tls = pki.issue(&ca, "spiffe://a.example/isthmus/gateway/gw-a", "tls");
    let bundle = pki.path().join("a-bundle.pem");
    let mut both = std::fs::read(ca.join("bundle.pem")).unwrap();
    both.extend(std::fs::read(ca2.join("bundle.pem")).unwrap());
    std::fs::write(&bundle, both).unwrap();
    let (admin, endpoint) = (free_addr(), free_addr());
    let config = gateway_config(
        "gw-a",
        "a.example",
        admin,
        &tls,
        &bundle,
        &format!("[trust.bundle_endpoint]\nlisten = \"{endpoint}\"\n"),
    );
    let mut gw = Gateway::start(&config, admin, &[]).unwrap();
    gw.wait_ready(START).unwrap();

    let url = format!("https://{endpoint}/");
    let bundle_json = ca.join("bundle.json");
    let out = python_client()
        .args(["-c", JWCRYPTO_READ])
        .arg(ca.join("ca.crt"))
        .args([bundle_json.to_str().unwrap(), &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "jwcrypto refused our bundle: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let from = |source: &str| keys.iter().filter(|k| k["source"] == source).count();
    assert_eq!((from(bundle_json.to_str().unwrap()), from(&url)), (1, 2));
    for key in &keys {
        let raw = &key["raw"];
        assert_eq!(raw["use"], "x509-svid", "{raw}");
        assert_eq!((&raw["kty"], &raw["crv"]), (&"EC".into(), &"P-256".into()));
        assert!(raw.get("kid").is_none(), "X509-SVID §6.1: no kid: {raw}");
        let x5c = raw["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1, "{raw}");
        let from_x5c = openssl_public_key(x5c[0].as_str().unwrap());
        assert_eq!(key["pem"].as_str().unwrap(), from_x5c, "{raw}");
    }

    gw.signal("TERM").unwrap();
    let (status, _) = gw.wait_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(0));
}
