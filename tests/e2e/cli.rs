//! The `isthmus` command line as a user runs it: exit codes, messages, overrides.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::net::TcpListener;
use std::time::Duration;

use isthmus_tests::{Gateway, free_addr, isthmus, minimal_config, wait_for, workspace_root};

fn packaged_config() -> String {
    workspace_root()
        .join("config/isthmus.toml")
        .display()
        .to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write_temp(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn check_config_accepts_the_packaged_file() {
    let out = isthmus(&["check-config", "--config", &packaged_config()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

#[test]
fn check_config_rejects_an_unknown_key_with_78() {
    let mut text = std::fs::read_to_string(packaged_config()).unwrap();
    // The key lands in the file's last table.
    let last_table = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix('[')?.strip_suffix(']'))
        .expect("the packaged file has tables")
        .to_owned();
    text.push_str("\nbogus_key = 1\n");
    let f = write_temp(&text);
    let out = isthmus(
        &["check-config", "--config", f.path().to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains(&format!("{last_table}.bogus_key: unknown key")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_config_prints_every_problem_one_per_line() {
    let f = write_temp("[gateway]\nname = \"UPPER\"\n[admin]\nlisten = \"x\"\nport = 1\n");
    let out = isthmus(&["check-config", "-c", f.path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    for line in [
        "admin.port: unknown key",
        "gateway.name: contains 'U'",
        "gateway.cluster: is required",
        "gateway.trust_domain: is required",
        "gateway.locality.region: is required",
        "admin.listen: \"x\" is not an address",
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(line)),
            "missing {line:?} in:\n{err}"
        );
    }
}

#[test]
fn environment_overrides_reach_the_effective_config() {
    let out = isthmus(
        &["print-config", "--config", &packaged_config()],
        &[
            ("ISTHMUS__GATEWAY__LOCALITY__ZONE", "zone-from-env"),
            ("ISTHMUS__ADMIN__LISTEN", "127.0.0.1:25999"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("zone = \"zone-from-env\""), "{printed}");
    assert!(
        printed.contains("listen = \"127.0.0.1:25999\""),
        "{printed}"
    );
    // What print-config prints is itself a valid configuration.
    let f = write_temp(&printed);
    let again = isthmus(&["check-config", "-c", f.path().to_str().unwrap()], &[]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
}

#[test]
fn an_invalid_environment_override_is_a_config_error() {
    let out = isthmus(
        &["check-config", "--config", &packaged_config()],
        &[("ISTHMUS__RUNTIME__THREADS", "lots")],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("runtime.threads:"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_command_lines_exit_64_and_help_exits_0() {
    assert_eq!(isthmus(&[], &[]).status.code(), Some(64));
    assert_eq!(isthmus(&["frobnicate"], &[]).status.code(), Some(64));
    assert_eq!(isthmus(&["run", "--nope"], &[]).status.code(), Some(64));
    assert_eq!(isthmus(&["--help"], &[]).status.code(), Some(0));
    let v = isthmus(&["version"], &[]);
    assert_eq!(v.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("isthmus 0."));
}

#[test]
fn run_with_an_invalid_config_exits_78_before_binding() {
    let admin = free_addr();
    let text = minimal_config("gw", admin).replace("threads = 1", "threads = -1");
    let f = write_temp(&text);
    let out = isthmus(&["run", "--config", f.path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("runtime.threads: -1 is out of range"),
        "{}",
        stderr(&out)
    );
    // Nothing was left listening.
    TcpListener::bind(admin).expect("admin port still free");
}

#[test]
fn run_with_its_port_taken_fails_with_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap();
    let f = write_temp(&minimal_config("gw", admin));
    let mut child = std::process::Command::new(isthmus_tests::isthmus_bin())
        .args(["run", "--config", f.path().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(Duration::from_secs(10), "isthmus to exit", || {
        child.try_wait().unwrap()
    })
    .unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("admin.listen: cannot listen on {admin}")),
        "{log}"
    );
    // Lines buffered before the error are written out too.
    assert!(log.contains("isthmus starting"), "{log}");
}

#[test]
fn probe_exits_0_on_a_ready_gateway_and_1_otherwise() {
    let admin = free_addr();
    let mut gw = Gateway::start(&minimal_config("gw-probe", admin), admin, &[]).unwrap();
    gw.wait_ready(Duration::from_secs(20)).unwrap();
    let ready = isthmus(&["probe", &format!("http://{admin}/readyz")], &[]);
    assert_eq!(ready.status.code(), Some(0), "{ready:?}");
    let missing = isthmus(&["probe", &format!("http://{admin}/nothing-here")], &[]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("answered 404"));
    let closed = isthmus(&["probe", &format!("http://{}/readyz", free_addr())], &[]);
    assert_eq!(closed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&closed.stderr).contains("refused"));
}
