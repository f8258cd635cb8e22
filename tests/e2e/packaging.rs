//! `packaging/build.sh` checked from the outside: what the .deb and the .rpm
//! hold (`dpkg-deb -c/-I`, `rpm -qpl/-qpi/-qpc/--scripts`), lintian, the
//! packaged unit through `systemd-analyze verify` and `security`, and the
//! packaged Prometheus rules through `promtool`. It packages
//! the debug binary the other tests use (`--profile dev --no-build`).
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::path::Path;
use std::process::Command;

use isthmus_tests::{isthmus_bin, target_dir, workspace_root};

/// Runs `program args`, returns stdout; panics with stderr when it fails.
/// `CARGO_TARGET_DIR` names where the binary to package was built.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout + &stderr
}

fn built(output: &str, kind: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{kind}: ")))
        .unwrap_or_else(|| panic!("no {kind} in the build output:\n{output}"))
        .to_owned()
}

/// Asserts that each of `paths` has a line of `listing` that `names` it.
fn assert_listed(listing: &str, paths: &[&str], names: impl Fn(&str, &str) -> bool) {
    for path in paths {
        assert!(
            listing.lines().any(|l| names(l, path)),
            "{path} missing:\n{listing}"
        );
    }
}

#[test]
fn packages_hold_the_gateway_and_pass_lintian_and_systemd_analyze() {
    isthmus_bin(); // the debug build the packages hold
    let out_dir = tempfile::tempdir().unwrap();
    let build = workspace_root().join("packaging/build.sh");
    let output = run(
        "bash",
        &[
            build.to_str().unwrap(),
            "--profile",
            "dev",
            "--no-build",
            "--out",
            out_dir.path().to_str().unwrap(),
        ],
    );
    assert!(
        output.contains("lintian: no errors or warnings"),
        "{output}"
    );
    let (deb, rpm) = (built(&output, "deb"), built(&output, "rpm"));

    // .deb: contents, control data, conffiles, maintainer scripts.
    let contents = run("dpkg-deb", &["-c", &deb]);
    let deb_paths = [
        "./usr/bin/isthmus",
        "./etc/isthmus/isthmus.toml",
        "./usr/lib/systemd/system/isthmus.service",
        "./usr/lib/sysusers.d/isthmus.conf",
        "./usr/share/man/man1/isthmus.1.gz",
        "./usr/share/doc/isthmus/copyright",
        "./usr/share/doc/isthmus/changelog.Debian.gz",
        "./usr/share/doc/isthmus/README.md",
        "./usr/share/doc/isthmus/operations.md",
        "./usr/share/doc/isthmus/examples/cluster-east.toml",
        "./usr/share/doc/isthmus/examples/cluster-west.toml",
        "./usr/share/doc/isthmus/examples/edge-vm.toml",
        "./usr/share/lintian/overrides/isthmus",
        "./usr/share/isthmus/monitoring/README.md",
        "./usr/share/isthmus/monitoring/isthmus.rules.yml",
        "./usr/share/isthmus/monitoring/isthmus.rules.test.yml",
        "./usr/share/isthmus/monitoring/grafana/isthmus.json",
    ];
    assert_listed(&contents, &deb_paths, |line, path| {
        line.ends_with(&format!(" {path}"))
    });
    let info = run("dpkg-deb", &["-I", &deb]);
    for line in ["Package: isthmus", "Section: net"] {
        assert!(info.contains(line), "{line:?} missing:\n{info}");
    }
    let depends = info
        .lines()
        .find(|l| l.trim_start().starts_with("Depends:"));
    assert!(
        depends.is_some_and(|d| d.contains("libc6") && d.contains("adduser")),
        "{info}"
    );
    let conffiles = run("dpkg-deb", &["-I", &deb, "conffiles"]);
    assert_eq!(conffiles.trim(), "/etc/isthmus/isthmus.toml");
    let postinst = run("dpkg-deb", &["-I", &deb, "postinst"]);
    // A fresh install neither enables nor starts the unconfigured service.
    let commands: Vec<&str> = postinst
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for forbidden in [
        "systemctl start",
        "systemctl enable",
        "deb-systemd-invoke start",
        "deb-systemd-helper enable",
    ] {
        assert!(
            !commands.iter().any(|l| l.contains(forbidden)),
            "postinst: {postinst}"
        );
    }
    assert!(postinst.contains("--signal=SIGUSR2"), "{postinst}");
    let prerm = run("dpkg-deb", &["-I", &deb, "prerm"]);
    assert!(prerm.contains("stop isthmus.service"), "{prerm}");

    // .rpm: the same files, the conffile kept on upgrade, stop on erase.
    let list = run("rpm", &["-qpl", &rpm]);
    let rpm_paths = [
        "/usr/bin/isthmus",
        "/etc/isthmus/isthmus.toml",
        "/usr/lib/systemd/system/isthmus.service",
        "/usr/lib/sysusers.d/isthmus.conf",
        "/usr/share/man/man1/isthmus.1",
        "/usr/share/doc/isthmus/README.md",
        "/usr/share/doc/isthmus/operations.md",
        "/usr/share/doc/isthmus/examples/cluster-east.toml",
        "/usr/share/doc/isthmus/examples/cluster-west.toml",
        "/usr/share/doc/isthmus/examples/edge-vm.toml",
        "/usr/share/isthmus/monitoring/README.md",
        "/usr/share/isthmus/monitoring/isthmus.rules.yml",
        "/usr/share/isthmus/monitoring/isthmus.rules.test.yml",
        "/usr/share/isthmus/monitoring/grafana/isthmus.json",
    ];
    assert_listed(&list, &rpm_paths, |line, path| line == path);
    let info = run("rpm", &["-qpi", &rpm]);
    for line in ["Name        : isthmus", "License     : Apache-2.0"] {
        assert!(info.contains(line), "{line:?} missing:\n{info}");
    }
    assert_eq!(
        run("rpm", &["-qpc", &rpm]).trim(),
        "/etc/isthmus/isthmus.toml"
    );
    let scripts = run("rpm", &["-qp", "--scripts", &rpm]);
    assert!(
        scripts.contains("preuninstall scriptlet") && scripts.contains("disable --now"),
        "{scripts}"
    );
    assert!(run("rpm", &["-K", &rpm]).contains("digests OK"));

    // The packaged files, unpacked: the binary accepts the packaged
    // configuration, and systemd accepts the unit.
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().to_str().unwrap();
    run("dpkg-deb", &["-x", &deb, root_path]);
    let checked = run(
        &format!("{root_path}/usr/bin/isthmus"),
        &[
            "check-config",
            "--config",
            &format!("{root_path}/etc/isthmus/isthmus.toml"),
        ],
    );
    assert!(checked.contains("configuration is valid"), "{checked}");
    // The packaged rules load and pass their unit tests where they are
    // installed (the tests name the rules file beside them).
    let monitoring = format!("{root_path}/usr/share/isthmus/monitoring");
    let rules = run(
        "promtool",
        &["check", "rules", &format!("{monitoring}/isthmus.rules.yml")],
    );
    assert!(rules.contains("SUCCESS"), "{rules}");
    let tested = run(
        "promtool",
        &[
            "test",
            "rules",
            &format!("{monitoring}/isthmus.rules.test.yml"),
        ],
    );
    assert!(tested.contains("SUCCESS"), "{tested}");
    assert_unit_verifies(root.path());
    let security = run(
        "systemd-analyze",
        &[
            "security",
            "--offline=true",
            &format!("--root={root_path}"),
            "isthmus.service",
        ],
    );
    let exposure: f64 = security
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for isthmus.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level:\n{security}"));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure}:\n{security}");
}

/// `systemd-analyze verify` on the unit inside `root`, with the host's
/// targets, `/bin/kill` (ExecReload) and `/bin/sh` (ExecStop) beside it. It exits 0 even on unknown
/// keys, so any output at all is a failure.
fn assert_unit_verifies(root: &Path) {
    let units = root.join("usr/lib/systemd/system");
    for entry in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let is_target = name.to_string_lossy().ends_with(".target");
        if is_target && entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), units.join(&name)).unwrap();
        }
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    for program in ["kill", "sh"] {
        std::fs::copy(format!("/bin/{program}"), root.join("bin").join(program)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("/usr/lib/systemd/system/isthmus.service")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );
}
