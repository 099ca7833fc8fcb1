//! The dashboards and alerts against a real Prometheus: Debian's `prometheus`
//! (the package CI installs, beside promtool) scrapes `ese up` under a short
//! load, and every Grafana panel query and every alerting and recording rule
//! of `config/alerts.yml` goes through its HTTP API. Each is valid PromQL to
//! it, each panel query returns data, and every rule evaluates without error.
//!
//! The test fails, rather than skips, when `prometheus` is not installed:
//! `scripts/test` installs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{SIM_ACCOUNT, TestApp, free_port};
use crate::single_node::Up;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// What every panel and query of a dashboard names as its data source: the
/// dashboard's `datasource` variable.
fn datasource_variable(kind: &str) -> Value {
    json!({"type": kind, "uid": "${datasource}"})
}

/// A fresh folder under the temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("{what}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The port of `key` (`127.0.0.1:PORT`) in the environment [`Up`] gives `ese up`.
fn port_in(up: &Up, key: &str) -> u16 {
    up.env()
        .into_iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.rsplit(':').next().and_then(|p| p.parse().ok()))
        .unwrap_or_else(|| panic!("Up sets {key} to 127.0.0.1:PORT"))
}

/// A Prometheus server in a child process, on a free port, with its TSDB in
/// a folder of its own. Killed (and the folder removed) when dropped, however
/// the test ends.
struct Prometheus {
    child: Child,
    base: String,
    http: reqwest::Client,
    // Dropped after `drop` has killed the process.
    dir: TempDir,
}

impl Prometheus {
    /// Starts `prometheus` on `config` (prometheus.yml's text) and waits
    /// until it says it is ready.
    async fn start(config: &str) -> Prometheus {
        let dir = TempDir::new("ese-prometheus");
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log"))
            .expect("create prometheus.log");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start prometheus ({e}): install Debian's prometheus package \
                     (apt-get install -y prometheus), as scripts/test and CI do"
                )
            });
        let mut prometheus = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: ese::http::client_builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            dir,
        };
        // Ready once it has loaded its config and rules and opened its TSDB;
        // a config or rule file it refuses makes it exit.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = prometheus
                .http
                .get(format!("{}/-/ready", prometheus.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return prometheus;
            }
            if let Some(status) = prometheus.child.try_wait().expect("wait for prometheus") {
                panic!("prometheus exited with {status}:\n{}", prometheus.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 60 s:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Its log so far, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` with `params` on the HTTP API: the `data` of a `success`
    /// answer, or what went wrong (Prometheus's `errorType: error` for a
    /// query it refuses, with a 4xx).
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = url::Url::parse_with_params(&format!("{}{path}", self.base), params)
            .map_err(|e| format!("URL: {e}"))?;
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = r.status();
        let body: Value = r
            .json()
            .await
            .map_err(|e| format!("GET {path}: {status}, not JSON: {e}"))?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!(
                "{status} {}: {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or("?")
            ))
        }
    }

    /// An instant query, evaluated now.
    async fn query(&self, expr: &str) -> Result<Value, String> {
        self.api("/api/v1/query", &[("query", expr)]).await
    }

    /// The rule groups it has loaded, with each rule's health and query.
    async fn rule_groups(&self) -> Vec<Value> {
        let data = self
            .api("/api/v1/rules", &[])
            .await
            .unwrap_or_else(|e| panic!("/api/v1/rules: {e}"));
        data["groups"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until every target of `jobs` has been scraped (`up` is 1).
    async fn wait_scraping(&self, jobs: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = self.query("up").await.unwrap_or(Value::Null);
            let scraped = |job: &str| {
                up["result"].as_array().is_some_and(|r| {
                    r.iter()
                        .any(|s| s["metric"]["job"] == job && s["value"][1] == "1")
                })
            };
            if jobs.iter().all(|j| scraped(j)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus did not scrape every job of {jobs:?} within 60 s: up = {up}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The prometheus.yml of the test: config/prometheus.yml's jobs, all on the
/// one `ese up` process, every second, with config/alerts.yml evaluated
/// every second too. `ese up` serves on its metrics listener what the
/// compose deployment's bridge and stages each serve on theirs, and its
/// simulator the same registry on its own port: each job sees every series
/// (sums count them three times, which changes no query's validity or
/// whether it has data).
fn prometheus_yml(metrics: u16, sim: u16) -> String {
    let alerts = repo("config/alerts.yml").display().to_string();
    format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s

rule_files:
  - {alerts:?}

scrape_configs:
  - job_name: bridge
    static_configs:
      - targets: ["127.0.0.1:{metrics}"]
        labels:
          service: bridge
  - job_name: stages
    static_configs:
      - targets: ["127.0.0.1:{metrics}"]
        labels:
          service: stages
  - job_name: provider-sim
    static_configs:
      - targets: ["127.0.0.1:{sim}"]
        labels:
          service: provider-sim
"#
    )
}

/// The dashboards of config/grafana/dashboards, by file name, parsed.
fn dashboards() -> Vec<(String, Value)> {
    let dir = repo("config/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dashboard entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read dashboard");
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            let name = path.file_name().expect("file name").to_string_lossy();
            (name.into_owned(), json)
        })
        .collect()
}

/// Every panel of a dashboard, those inside rows too.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard's templating variable called `name`.
fn variable<'a>(dashboard: &'a Value, name: &str) -> Option<&'a Value> {
    dashboard["templating"]["list"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
}

/// One query of one panel.
struct PanelQuery {
    /// `file.json / Panel title [refId]`, for failure messages.
    at: String,
    expr: String,
}

/// Every target `expr` of every panel of every dashboard.
fn panel_queries() -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for (file, dashboard) in dashboards() {
        for panel in panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(PanelQuery {
                        at: format!(
                            "{file} / {} [{}]",
                            panel["title"].as_str().unwrap_or("?"),
                            target["refId"].as_str().unwrap_or("?")
                        ),
                        expr: expr.to_string(),
                    });
                }
            }
        }
    }
    out
}

/// `expr` as Grafana sends it to Prometheus: every stage selected (`$stage`
/// is the stage variable's All value, `.*`) and the built-in intervals at
/// values a dashboard of the last hour gets.
fn as_grafana_sends(expr: &str) -> String {
    [
        ("${stage}", ".*"),
        ("$stage", ".*"),
        ("${__rate_interval}", "1m"),
        ("$__rate_interval", "1m"),
        ("${__interval}", "15s"),
        ("$__interval", "15s"),
        ("${__range}", "5m"),
        ("$__range", "5m"),
    ]
    .iter()
    .fold(expr.to_string(), |e, (var, value)| e.replace(var, value))
}

/// Whether a query's `data` holds something to draw: a vector or matrix with
/// a series, or a scalar.
fn has_data(data: &Value) -> bool {
    data["result"].as_array().is_some_and(|r| !r.is_empty())
}

/// The rule names of config/alerts.yml by group, in file order.
fn rules_in_file() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(repo("config/alerts.yml")).expect("read alerts.yml");
    let yaml: Value = serde_yaml_ng::from_str(&text).expect("alerts.yml parses");
    let mut out = BTreeMap::new();
    for group in yaml["groups"].as_array().expect("alerts.yml has groups") {
        let names = group["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                r["alert"]
                    .as_str()
                    .or(r["record"].as_str())
                    .unwrap_or("?")
                    .to_string()
            })
            .collect();
        out.insert(
            group["name"].as_str().expect("group name").to_string(),
            names,
        );
    }
    out
}

/// The dashboards pick their Prometheus through a `datasource` variable
/// (every panel and every query use it; none names a data source's uid), and
/// the per-stage queries follow a `stage` variable: multi-valued, with an
/// All that matches every stage, filtering every selector of the `ese_stage_*`
/// metrics.
#[test]
fn dashboards_use_their_datasource_and_stage_variables() {
    let mut problems = Vec::new();
    for (file, dashboard) in dashboards() {
        // Prometheus, or PostgreSQL for the data model's reports.
        let kind = match variable(&dashboard, "datasource") {
            Some(v)
                if v["type"] == "datasource"
                    && (v["query"] == "prometheus"
                        || v["query"] == "grafana-postgresql-datasource") =>
            {
                v["query"].as_str().unwrap_or_default().to_string()
            }
            other => {
                problems.push(format!(
                    "{file}: no `datasource` variable of type datasource over prometheus or postgres: {other:?}"
                ));
                continue;
            }
        };
        let expected = || datasource_variable(&kind);
        let mut uses_stage = false;
        for panel in panels(&dashboard) {
            let title = panel["title"].as_str().unwrap_or("?");
            if panel["datasource"] != expected() {
                problems.push(format!(
                    "{file} / {title}: datasource {} (want {})",
                    panel["datasource"],
                    expected()
                ));
            }
            for target in panel["targets"].as_array().into_iter().flatten() {
                if target["datasource"] != expected() {
                    problems.push(format!(
                        "{file} / {title} [{}]: datasource {}",
                        target["refId"], target["datasource"]
                    ));
                }
                let expr = target["expr"].as_str().unwrap_or_default();
                uses_stage |= expr.contains("$stage");
                // Every selector of an ese_stage_* metric filters on the variable.
                let mut rest = expr;
                while let Some(i) = rest.find("ese_stage_") {
                    let tail = &rest[i..];
                    let name_end = tail
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(tail.len());
                    let after = &tail[name_end..];
                    let selector = after
                        .strip_prefix('{')
                        .and_then(|s| s.split_once('}'))
                        .map(|(inside, _)| inside)
                        .unwrap_or_default();
                    if !selector.contains(r#"stage=~"$stage""#) {
                        problems.push(format!(
                            "{file} / {title}: {} not filtered by stage=~\"$stage\" in {expr}",
                            &tail[..name_end]
                        ));
                    }
                    rest = after;
                }
            }
        }
        if uses_stage {
            match variable(&dashboard, "stage") {
                Some(v)
                    if v["type"] == "query"
                        && v["multi"] == true
                        && v["includeAll"] == true
                        && v["allValue"] == ".*" => {}
                other => problems.push(format!(
                    "{file}: uses $stage without a multi-valued `stage` variable whose All is .*: {other:?}"
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_up_answers_every_panel_query_and_evaluates_every_rule() {
    let app = TestApp::spawn().await;
    let data = TempDir::new("ese-data");
    let up = Up::new(data.path(), None);
    let engine = up.start(&app, &["--with-provider-sim"]).await;
    let (metrics, sim) = (
        port_in(&up, "ESE__METRICS__LISTEN"),
        port_in(&up, "ESE__PROVIDER_SIM__LISTEN"),
    );
    let prometheus = Prometheus::start(&prometheus_yml(metrics, sim)).await;

    // The load: the README's demo, 50 users through a campaign to the
    // simulator and back. Its first recipient (`ese demo` numbers them from
    // +14155000000) is scripted to end UNDELIVERED, so the delivery panels
    // have a failure to show beside the deliveries.
    let http = ese::http::client_builder().build().expect("http client");
    let scripted = http
        .post(format!("http://127.0.0.1:{sim}/sim/script"))
        .basic_auth(SIM_ACCOUNT, Some(crate::fixtures::TOKEN))
        .json(&json!({"to": "+14155000000", "outcomes": [{"delivery": "undelivered"}]}))
        .send()
        .await
        .expect("simulator answers");
    assert!(
        scripted.status().is_success(),
        "the simulator refused the script: {}",
        scripted.status()
    );
    let (ok, out, err) = app
        .run_ese_with(&["demo", "--users", "50", "--timeout", "120s"], &up.env())
        .await;
    assert!(ok, "ese demo failed:\n{out}\n{err}");
    prometheus
        .wait_scraping(&["bridge", "stages", "provider-sim"])
        .await;

    // Every panel query is valid PromQL and returns data. A series the load
    // has just created needs two scrapes before rate() sees it: queries are
    // asked again, every 2 s, until all answer or a minute has passed.
    let queries = panel_queries();
    assert!(queries.len() > 20, "the dashboards have queries");
    let deadline = Instant::now() + Duration::from_secs(60);
    let failures = loop {
        let mut failures = Vec::new();
        for q in &queries {
            let promql = as_grafana_sends(&q.expr);
            if promql.contains('$') {
                failures.push(format!(
                    "{}: a variable this test does not know: {}",
                    q.at, q.expr
                ));
                continue;
            }
            match prometheus.query(&promql).await {
                Ok(data) if has_data(&data) => {}
                Ok(data) => failures.push(format!("{}: no data: {promql} = {data}", q.at)),
                Err(e) => failures.push(format!("{}: {e}: {promql}", q.at)),
            }
        }
        if failures.is_empty() || Instant::now() > deadline {
            break failures;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(
        failures.is_empty(),
        "panel queries that fail or return no data after the demo:\n{}",
        failures.join("\n")
    );

    // Every `label_values(METRIC, LABEL)` variable has values to offer, as
    // Grafana asks for them (the label values API, matched on the metric).
    for (file, dashboard) in dashboards() {
        let variables = dashboard["templating"]["list"].as_array();
        for v in variables.into_iter().flatten() {
            // The query editor's object ({"query": …}) or the older plain string.
            let query = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or("");
            let Some(args) = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
            else {
                continue;
            };
            let Some((metric, label)) = args.split_once(',') else {
                continue;
            };
            let values = prometheus
                .api(
                    &format!("/api/v1/label/{}/values", label.trim()),
                    &[("match[]", metric.trim())],
                )
                .await
                .unwrap_or_else(|e| panic!("{file}: variable {}: {e}", v["name"]));
            assert!(
                values.as_array().is_some_and(|a| !a.is_empty()),
                "{file}: variable {} offers nothing: {query}",
                v["name"]
            );
        }
    }

    // Every rule group of config/alerts.yml is loaded with all its rules, and
    // once each rule has been evaluated (every second), none has an error.
    let want = rules_in_file();
    let deadline = Instant::now() + Duration::from_secs(30);
    let groups = loop {
        let groups = prometheus.rule_groups().await;
        let unevaluated = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .any(|r| r["health"] == "unknown");
        if !unevaluated || Instant::now() > deadline {
            break groups;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let loaded: BTreeMap<String, Vec<String>> = groups
        .iter()
        .map(|g| {
            let names = g["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| r["name"].as_str().unwrap_or("?").to_string())
                .collect();
            (g["name"].as_str().unwrap_or("?").to_string(), names)
        })
        .collect();
    assert_eq!(
        loaded, want,
        "Prometheus loaded the rules of config/alerts.yml"
    );
    let mut failures = Vec::new();
    for group in &groups {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let at = format!(
                "{} / {}",
                group["name"].as_str().unwrap_or("?"),
                rule["name"].as_str().unwrap_or("?")
            );
            if rule["health"] != "ok" {
                failures.push(format!(
                    "{at}: health {} ({})",
                    rule["health"], rule["lastError"]
                ));
            }
            // The expression as Prometheus read it, evaluated on its own:
            // valid PromQL (an empty result is fine: nothing is alerting).
            let expr = rule["query"].as_str().unwrap_or_default();
            if let Err(e) = prometheus.query(expr).await {
                failures.push(format!("{at}: {e}: {expr}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "alert rules that do not evaluate:\n{}",
        failures.join("\n")
    );

    drop(prometheus);
    drop(engine);
}
