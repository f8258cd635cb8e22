//! The shipped monitoring (`monitoring/`): Debian's `promtool` checks the
//! rules and runs their unit tests, and Debian's `prometheus` scrapes a
//! running federation and evaluates every dashboard panel and every rule
//! through its HTTP API.
//!
//! How an expression is judged against the live federation: every one must
//! parse (`status` `success`); a dashboard panel, a dashboard variable and a
//! recording rule must return series as they are; an alert must return
//! series with its final threshold comparison removed (`... > 0.05` is
//! evaluated as `...`), since a healthy alert is an empty one. The test
//! makes the events that a healthy federation never counts, so their
//! series exist: 502s (a service whose only endpoint is down), failovers and
//! panic mode, a SERVFAIL (a dead upstream resolver), a rejected
//! configuration reload, a rejected bundle file and a peer gateway that dies.
//! Dashboard variables become `$cluster` = both clusters, `$service` = `.*`,
//! `$__rate_interval` = `1m`.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isthmus_tests::dns::dig;
use isthmus_tests::mesh::{Mesh, reload, web_service};
use isthmus_tests::{
    Behaviour, EchoServer, Gateway, curl, free_addr, replace_file, workspace_root,
};
use serde_json::Value;

const RULES: &str = "monitoring/isthmus.rules.yml";
const RULE_TESTS: &str = "monitoring/isthmus.rules.test.yml";
const DASHBOARD: &str = "monitoring/grafana/isthmus.json";

/// Runs `promtool args` in `monitoring/`; returns its output, panicking with
/// it when promtool fails.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(workspace_root().join("monitoring"))
        .output()
        .expect("promtool is installed (Debian package prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap()
}

/// The names that follow `key: ` on lines of `yaml` (`alert`, `record`).
fn names(yaml: &str, key: &str) -> Vec<String> {
    let prefix = format!("- {key}: ");
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn promtool_checks_the_rules_and_each_alert_fires_and_stays_silent_in_its_unit_tests() {
    let checked = promtool(&["check", "rules", "isthmus.rules.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "isthmus.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Each alert has a case where it fires (some expected alert) and one
    // where it stays silent (`exp_alerts: []`).
    let tests = read(RULE_TESTS);
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let cases: Vec<(&str, bool)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let alert = l.strip_prefix("alertname: ")?;
            let silent = lines.get(i + 1) == Some(&"exp_alerts: []");
            Some((alert, silent))
        })
        .collect();
    let alerts = names(&read(RULES), "alert");
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in &alerts {
        for silent in [false, true] {
            assert!(
                cases.contains(&(alert.as_str(), silent)),
                "{RULE_TESTS} has no case where {alert} {}",
                if silent { "stays silent" } else { "fires" }
            );
        }
    }
}

/// A Prometheus server (Debian's) on loopback with its storage in a
/// temporary directory; killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes each `(admin address, cluster)` every second as job
    /// `isthmus` with target label `gateway_cluster`, and evaluates the
    /// shipped rules every second.
    fn start(targets: &[(SocketAddr, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr();
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: isthmus\n    static_configs:\n",
            workspace_root().join(RULES).display()
        );
        for (target, cluster) in targets {
            config.push_str(&format!(
                "      - targets: [\"{target}\"]\n        labels:\n          gateway_cluster: {cluster}\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (Debian package prometheus)");
        let prometheus = Self {
            child,
            addr,
            _dir: dir,
        };
        prometheus.wait_until("Prometheus ready", |p| {
            (curl(&[&format!("http://{}/-/ready", p.addr)]).status == 200).then_some(())
        });
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/PATH` (with form `args`), as JSON.
    fn api(&self, path: &str, args: &[String]) -> Value {
        let mut curl_args = Vec::new();
        for arg in args {
            curl_args.extend(["--data-urlencode", arg.as_str()]);
        }
        let url = format!("http://{}/api/v1/{path}", self.addr);
        curl_args.push(&url);
        let r = curl(&curl_args);
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {r:?}"))
    }

    /// `/api/v1/query` of `expr` now: its result, or the error.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let answer = self.api("query", &[format!("query={expr}")]);
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    fn wait_until<T>(&self, what: &str, mut f: impl FnMut(&Self) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; Prometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An expression to evaluate and where it comes from.
struct Expr {
    origin: String,
    expr: String,
    /// An alert: evaluated without its final threshold comparison.
    alert: bool,
}

/// Every panel target and variable query of the dashboard, with its
/// variables substituted.
fn dashboard_exprs(dashboard: &Value) -> Vec<Expr> {
    let substitute = |e: &str| {
        e.replace("$cluster", "gw-a-cluster|gw-b-cluster")
            .replace("$service", ".*")
            .replace("$__rate_interval", "1m")
    };
    let mut exprs = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        // A collapsed row holds its panels.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(Expr {
                origin: format!(
                    "panel {:?} {}",
                    panel["title"].as_str().unwrap_or_default(),
                    target["refId"].as_str().unwrap_or_default()
                ),
                expr: substitute(target["expr"].as_str().unwrap()),
                alert: false,
            });
        }
    }
    // label_values(SELECTOR, LABEL) has data when `count by (LABEL)
    // (SELECTOR)` has.
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(query) = var["query"]["query"].as_str() else {
            continue;
        };
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("variable {}: {query}", var["name"]));
        exprs.push(Expr {
            origin: format!("variable {}", var["name"]),
            expr: substitute(&format!("count by ({label}) ({selector})")),
            alert: false,
        });
    }
    exprs
}

/// `expr` without its final threshold comparison (`... > 0.05`,
/// `... < 7 * 86400`), or as it is when it has none.
fn without_threshold(expr: &str) -> &str {
    for op in [" > ", " < ", " >= ", " <= ", " == ", " != "] {
        if let Some((left, right)) = expr.rsplit_once(op)
            && right
                .chars()
                .all(|c| c.is_ascii_digit() || " .*".contains(c))
        {
            return left;
        }
    }
    expr
}

/// The anchors of the headings of a Markdown document.
fn anchors(markdown: &str) -> Vec<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// Shop services on port 8080 at `endpoints`.
fn service(name: &str, endpoints: &[SocketAddr], export: bool) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[[services]]\nnamespace = \"shop\"\nname = \"{name}\"\nports = [{{ port = 8080, name = \"http\" }}]\nendpoints = [{}]\nexport = {export}\n",
        endpoints.join(", ")
    )
}

#[test]
fn prometheus_scrapes_a_federation_and_evaluates_every_dashboard_and_rule_expression() {
    // A serves shop/down (its only endpoint is down) and shop/api (here
    // an endpoint that takes connections and closes them unanswered, in B
    // one that answers: attempts fail over); B serves shop/web and answers DNS
    // with a dead upstream resolver; C exports shop/extra, then dies.
    let mesh = Mesh::new(&["a", "b", "c"]);
    let (web, api_b, extra) = (
        EchoServer::start("web-in-b"),
        EchoServer::start("api-in-b"),
        EchoServer::start("extra-in-c"),
    );
    let api_a = EchoServer::start("api-in-a");
    api_a.set(Behaviour::Close);
    let (dead_down, dead_resolver) = (free_addr(), free_addr());
    let dns = free_addr();
    let a_config = mesh.full_config(
        0,
        &(service("api", &[api_a.addr], false) + &service("down", &[dead_down], false)),
    );
    let mut a = Gateway::start(&a_config, mesh.members[0].admin, &[]).unwrap();
    let b_services = format!(
        "{}{}[dns]\nlisten = \"{dns}\"\nupstreams = [\"{dead_resolver}\"]\nforward_timeout = \"200ms\"\nclusterset_ipv4_range = \"127.249.0.0/16\"\n",
        web_service(web.addr, true),
        service("api", &[api_b.addr], true)
    );
    let mut b = Gateway::start(
        &mesh.full_config(1, &b_services),
        mesh.members[1].admin,
        &[],
    )
    .unwrap();
    let mut c = Gateway::start(
        &mesh.full_config(2, &service("extra", &[extra.addr], true)),
        mesh.members[2].admin,
        &[],
    )
    .unwrap();
    for gw in [&mut a, &mut b, &mut c] {
        gw.wait_ready(Duration::from_secs(20)).unwrap();
    }
    let prometheus = Prometheus::start(&[
        (mesh.members[0].admin, "gw-a-cluster"),
        (mesh.members[1].admin, "gw-b-cluster"),
    ]);
    prometheus.wait_until("both gateways scraped", |p| {
        let up = p.query("up == 1").unwrap();
        (up.len() == 2).then_some(())
    });

    // Traffic from A's workloads: to B, failing over from A to B, and to
    // nowhere; then C's service, so A has used C's gateway before C dies.
    let outbound = mesh.members[0].outbound;
    let get = |service: &str| {
        curl(&[
            "-H",
            &format!("Host: {service}.shop.svc.clusterset.local:8080"),
            &format!("http://{outbound}/"),
        ])
    };
    prometheus.wait_until("A routes shop/web and shop/extra", |_| {
        (get("web").status == 200 && get("extra").status == 200).then_some(())
    });
    for _ in 0..20 {
        assert_eq!(get("web").status, 200);
        assert_eq!(get("api").status, 200);
        assert_eq!(get("down").status, 502);
    }
    assert_eq!(
        dig(dns, &["web.shop.svc.clusterset.local", "A"]).status,
        "NOERROR"
    );
    assert_eq!(dig(dns, &["www.upstream.test", "A"]).status, "SERVFAIL");
    drop(c);
    // A reload A cannot take, and a bundle file both refuse.
    reload(&a, "[gateway]\nname = 42\n").unwrap();
    replace_file(
        &mesh.members[0].ca.join("bundle.pem"),
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    // Both gateways keep serving.
    assert_eq!(get("web").status, 200);

    // Every rule loaded and evaluates without error.
    let rules_file = read(RULES);
    let expected = names(&rules_file, "alert").len() + names(&rules_file, "record").len();
    let rules: Vec<Value> = prometheus.wait_until("every rule evaluated", |p| {
        let groups = p.api("rules", &[]);
        let rules: Vec<Value> = groups["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (rules.len() == expected && rules.iter().all(|r| r["health"] == "ok")).then_some(rules)
    });

    // Each alert has a severity, says what and why, and points at a
    // runbook entry that exists.
    let operations = anchors(&read("docs/operations.md"));
    let mut exprs = Vec::new();
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        let alert = rule["type"] == "alerting";
        if alert {
            let severity = rule["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("critical" | "warning")),
                "{name}: {rule}"
            );
            for key in ["summary", "description"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|s| !s.is_empty()),
                    "{name} has no {key}"
                );
            }
            let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
            let anchor = runbook.strip_prefix("docs/operations.md#");
            assert!(
                anchor
                    .is_some_and(|a| a == name.to_lowercase() && operations.iter().any(|o| o == a)),
                "{name}: runbook {runbook:?} is no heading of docs/operations.md"
            );
        }
        exprs.push(Expr {
            origin: format!("rule {name}"),
            expr: rule["query"].as_str().unwrap().to_owned(),
            alert,
        });
    }
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    assert_eq!(dashboard["templating"]["list"][0]["name"], "datasource");
    exprs.extend(dashboard_exprs(&dashboard));
    assert!(exprs.len() > 40, "{}", exprs.len());

    // Each parses as it is; each has series (an alert without its
    // threshold). The series come with scrapes and rule evaluations of
    // the next seconds: retry the empty ones for a while.
    let mut pending: Vec<&Expr> = Vec::new();
    let mut broken = Vec::new();
    for e in &exprs {
        if let Err(error) = prometheus.query(&e.expr) {
            broken.push(format!("{}: {}: {error}", e.origin, e.expr));
        }
        pending.push(e);
    }
    assert!(
        broken.is_empty(),
        "expressions that do not parse:\n{broken:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        pending.retain(|e| {
            let expr = if e.alert {
                without_threshold(&e.expr)
            } else {
                &e.expr
            };
            prometheus.query(expr).unwrap().is_empty()
        });
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let empty: Vec<String> = pending
        .iter()
        .map(|e| format!("{}: {}", e.origin, e.expr))
        .collect();
    assert!(
        empty.is_empty(),
        "expressions without series after 30 s:\n{empty:#?}"
    );
}
