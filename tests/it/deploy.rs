//! The one-command run (`ese up`), the dashboards and alerts against what the
//! engine really exports, and the docker-compose deployment as far as it can
//! be checked without Docker.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Proc, TestApp, free_port};

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `ese_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("ese_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Every PromQL expression of the dashboards (`expr`) and alert rules.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn walk(file: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => {
                            out.push((file.to_string(), e.clone()))
                        }
                        _ => walk(file, v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(file, v, out)),
            _ => {}
        }
    }
    for entry in std::fs::read_dir(repo("config/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        assert!(json["uid"].is_string(), "{} has a uid", path.display());
        walk(&path.display().to_string(), &json, &mut out);
    }
    let alerts: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo("config/alerts.yml")).unwrap())
            .expect("alerts.yml parses");
    walk("config/alerts.yml", &alerts, &mut out);
    out
}

/// Sample names on a `/metrics` page.
fn exported(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn http() -> reqwest::Client {
    ese::http::client_builder().build().expect("http client")
}

async fn get(url: &str) -> Option<String> {
    let r = http().get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_everything_and_dashboards_name_only_exported_metrics() {
    let app = TestApp::spawn().await;
    app.seed_users(3, "'{}'::jsonb").await;
    let (bridge, metrics, sim) = (free_port(), free_port(), free_port());
    let env = [
        ("ESE__BRIDGE__LISTEN", format!("127.0.0.1:{bridge}")),
        (
            "ESE__BRIDGE__PUBLIC_URL",
            format!("http://127.0.0.1:{bridge}"),
        ),
        ("ESE__METRICS__LISTEN", format!("127.0.0.1:{metrics}")),
        ("ESE__PROVIDER_SIM__LISTEN", format!("127.0.0.1:{sim}")),
        ("ESE__METRICS__BUSINESS_INTERVAL", "200ms".to_string()),
        ("ESE_ADMIN_TOKEN", crate::harness::ADMIN_TOKEN.to_string()),
    ];
    let mut child = Proc::new(app.spawn_ese_piped(&["up", "--with-provider-sim"], &env));
    // The banner says what listens where.
    let stdout = child.child().stdout.take().unwrap();
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            let last = line.trim_start().starts_with("topics");
            lines.push(line);
            if last {
                break;
            }
        }
        lines.join("\n")
    })
    .await
    .unwrap();
    for want in [
        format!("http://127.0.0.1:{bridge}/webhooks/twilio/"),
        format!("http://127.0.0.1:{bridge}/api/v1"),
        format!("http://127.0.0.1:{metrics}/metrics"),
        format!("provider   http://127.0.0.1:{sim} (simulator"),
        app.settings.kafka.brokers.clone(),
    ] {
        assert!(banner.contains(&want), "banner names {want}:\n{banner}");
    }

    // The simulator answers, and the admin API with the token.
    let stats = get(&format!("http://127.0.0.1:{sim}/sim/stats")).await;
    assert!(stats.is_some(), "simulator up");
    let admin = http()
        .get(format!("http://127.0.0.1:{bridge}/api/v1/campaigns"))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);

    // Business gauges come from Postgres.
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        let page = get(&format!("http://127.0.0.1:{metrics}/metrics"))
            .await
            .unwrap_or_default();
        if page.contains("ese_business_opted_in_users 3") && page.contains("ese_dlq_records{") {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "business gauges never showed:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut names = exported(&page);
    let bridge_page = get(&format!("http://127.0.0.1:{bridge}/metrics"))
        .await
        .unwrap();
    names.extend(exported(&bridge_page));
    let exprs = expressions();
    assert!(exprs.len() > 20, "dashboards and alerts have expressions");
    let mut missing = Vec::new();
    for (file, expr) in &exprs {
        for name in metric_names(expr) {
            if !names.contains(&name) {
                missing.push(format!("{file}: {name} in {expr}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by the engine:\n{}",
        missing.join("\n")
    );

    // `ese demo` runs the loop on it: users → campaign → simulator → DELIVERED.
    let (ok, out, err) = app
        .run_ese_with(&["demo", "--users", "12", "--timeout", "90s"], &env)
        .await;
    assert!(ok, "demo failed:\n{out}\n{err}");
    assert!(out.contains("DELIVERED"), "{out}");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE status IN ('DELIVERED', 'READ', 'UNDELIVERED', 'FAILED')"
        )
        .await,
        12
    );
    let stats: serde_json::Value = serde_json::from_str(
        &get(&format!("http://127.0.0.1:{sim}/sim/stats"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stats["accepted"], 12, "the simulator got each message once");
    child.terminate().await;
}

fn compose() -> serde_json::Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(repo("docker-compose.yml")).unwrap())
        .expect("docker-compose.yml parses")
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn compose_mounts_exist_and_its_environment_is_valid_engine_config() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");
    for name in [
        "kafka",
        "schema-registry",
        "postgres",
        "prometheus",
        "grafana",
        "bridge",
        "stages",
        "provider-sim",
    ] {
        assert!(services.contains_key(name), "service {name}");
    }
    // Every bind mount's host side exists in the repository.
    for (name, s) in services {
        for v in s["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap();
            let host = v.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(
                    repo(host).exists(),
                    "{name} mounts {host}, which is missing"
                );
            }
        }
        if s["build"].is_string() {
            assert!(repo("Dockerfile").exists(), "{name} builds the Dockerfile");
        }
    }
    // The engine's environment loads as configuration (unknown keys would fail).
    let env = services["stages"]["environment"]
        .as_object()
        .expect("stages environment");
    let mut overrides = figment::Figment::new();
    for (k, v) in env {
        let v = v
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string());
        let key = match k.as_str() {
            "DATABASE_URL" => "database.url".to_string(),
            "KAFKA_BROKERS" => "kafka.brokers".to_string(),
            k if k.starts_with("ESE__") => ese::config::env_key(&k["ESE__".len()..].to_lowercase()),
            _ => continue,
        };
        let value: figment::value::Value = v.parse().unwrap();
        overrides = overrides.merge(figment::providers::Serialized::default(&key, value));
    }
    let settings = ese::config::Settings::load_with(None, overrides)
        .unwrap_or_else(|e| panic!("compose environment: {e}"));
    for s in ["bridge", "provider-sim", "stages"] {
        assert_eq!(
            services[s]["environment"], services["stages"]["environment"],
            "{s} shares the engine environment"
        );
    }
    // Published ports are the ones the engine listens on.
    let published = |svc: &str| -> Vec<u16> {
        services[svc]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| port_of(p.as_str().unwrap()))
            .collect()
    };
    assert!(published("bridge").contains(&settings.bridge.listen.port()));
    assert!(published("provider-sim").contains(&settings.provider_sim.listen.port()));
    let sim_cmd: Vec<&str> = services["provider-sim"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    if let Some(i) = sim_cmd.iter().position(|a| *a == "--listen") {
        assert_eq!(port_of(sim_cmd[i + 1]), settings.provider_sim.listen.port());
    }
    assert_eq!(
        port_of(&settings.provider.base_url),
        settings.provider_sim.listen.port(),
        "the sender calls the simulator"
    );
    assert_eq!(
        port_of(&settings.bridge.public_url),
        settings.bridge.listen.port(),
        "callbacks reach the bridge"
    );
    // Prometheus scrapes each engine service where it serves /metrics.
    let prom: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo("config/prometheus.yml")).unwrap())
            .expect("prometheus.yml parses");
    let mut targets = BTreeSet::new();
    for job in prom["scrape_configs"].as_array().unwrap() {
        for sc in job["static_configs"].as_array().unwrap() {
            for t in sc["targets"].as_array().unwrap() {
                targets.insert(t.as_str().unwrap().to_string());
            }
        }
    }
    for want in [
        format!("bridge:{}", settings.bridge.listen.port()),
        format!("stages:{}", settings.metrics.listen.port()),
        format!("provider-sim:{}", settings.provider_sim.listen.port()),
    ] {
        assert!(
            targets.contains(&want),
            "prometheus scrapes {want}: {targets:?}"
        );
    }
    assert!(
        prom["rule_files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().ends_with("alerts.yml"))
    );
}

/// Every alert rule passes `promtool check rules` and its unit tests in
/// `config/alerts.test.yml` (fires on its condition, stays quiet otherwise,
/// clears after recovery), and links a runbook section that exists.
#[test]
fn alert_rules_pass_promtool_and_each_alert_fires_and_clears() {
    let out = std::process::Command::new(repo("scripts/promtool"))
        .output()
        .expect("run scripts/promtool");
    assert!(
        out.status.success(),
        "scripts/promtool failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
