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

/// The simulator's `/sim/stats`, with the test account's credentials.
async fn sim_stats(url: &str) -> Option<String> {
    let r = http()
        .get(url)
        .basic_auth(crate::harness::SIM_ACCOUNT, Some(crate::fixtures::TOKEN))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
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
    let (bridge, admin_port, metrics, sim) = (free_port(), free_port(), free_port(), free_port());
    let env = [
        ("ESE__BRIDGE__LISTEN", format!("127.0.0.1:{bridge}")),
        ("ESE__ADMIN__LISTEN", format!("127.0.0.1:{admin_port}")),
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
        format!("http://127.0.0.1:{admin_port}/api/v1"),
        format!("http://127.0.0.1:{metrics}/metrics"),
        format!("provider   http://127.0.0.1:{sim} (simulator"),
        app.settings.kafka.brokers.clone(),
    ] {
        assert!(banner.contains(&want), "banner names {want}:\n{banner}");
    }

    // The simulator answers, and the admin API with the token.
    // Its controls need the account's credentials.
    let stats_url = format!("http://127.0.0.1:{sim}/sim/stats");
    let anonymous = http()
        .get(&stats_url)
        .send()
        .await
        .expect("simulator answers");
    assert_eq!(anonymous.status(), 401, "sim controls without credentials");
    let stats = sim_stats(&stats_url).await;
    assert!(stats.is_some(), "simulator up");
    // Its scripted outcomes are bounded: 1,001 for one number is refused.
    let outcomes: Vec<serde_json::Value> = (0..1001)
        .map(|_| serde_json::json!({"api_error": 30001}))
        .collect();
    let r = http()
        .post(format!("http://127.0.0.1:{sim}/sim/script"))
        .basic_auth(crate::harness::SIM_ACCOUNT, Some(crate::fixtures::TOKEN))
        .json(&serde_json::json!({"to": "+14155550199", "outcomes": outcomes}))
        .send()
        .await
        .expect("simulator answers");
    assert_eq!(r.status(), 413, "an unbounded script is refused");
    let admin = http()
        .get(format!("http://127.0.0.1:{admin_port}/api/v1/campaigns"))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    // The listener layout: the public webhook port serves webhooks and
    // probes only; the admin API and metrics are each on their own.
    let status = |url: String| async move {
        http()
            .get(&url)
            .bearer_auth(crate::harness::ADMIN_TOKEN)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    };
    for (path, want) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 404),
        ("/api/v1/campaigns", 404),
        ("/api/v1/openapi.json", 404),
    ] {
        assert_eq!(
            status(format!("http://127.0.0.1:{bridge}{path}")).await,
            want,
            "the webhook port answers {path} with {want}"
        );
    }
    for (path, want) in [("/metrics", 404), ("/api/v1/openapi.json", 200)] {
        assert_eq!(
            status(format!("http://127.0.0.1:{admin_port}{path}")).await,
            want,
            "the admin port answers {path} with {want}"
        );
    }
    for (path, want) in [("/api/v1/campaigns", 404), ("/healthz", 200)] {
        assert_eq!(
            status(format!("http://127.0.0.1:{metrics}{path}")).await,
            want,
            "the metrics port answers {path} with {want}"
        );
    }

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
    let names = exported(&page);
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
        &sim_stats(&format!("http://127.0.0.1:{sim}/sim/stats"))
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

/// The variables docker-compose.yml requires, as a user sets them (in the
/// environment or `.env`).
const COMPOSE_ENV: &[(&str, &str)] = &[
    ("TWILIO_ACCOUNT_SID", "ACcompose"),
    ("TWILIO_AUTH_TOKEN", "compose-auth-token"),
    ("ESE_ADMIN_TOKEN", "compose-admin-token"),
    ("POSTGRES_PASSWORD", "compose-pg-password"),
    ("GRAFANA_ADMIN_PASSWORD", "compose-grafana-password"),
];

/// A variable reference in a compose value: `${NAME}`, `${NAME<op><arg>}` or `$NAME`.
#[derive(Debug)]
struct VarRef {
    /// Where the whole reference sits in the text (bytes).
    span: std::ops::Range<usize>,
    name: String,
    /// `:?`, `?`, `:-`, `-`, `:+`, `+`, or empty.
    op: String,
    /// The error message, default or replacement after `op`.
    arg: String,
}

/// Every variable reference in `text`, as compose reads them (`$$` is a literal `$`).
fn var_refs(text: &str) -> Vec<VarRef> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'$') => i += 2,
            Some(b'{') => {
                let mut depth = 0;
                let mut end = None;
                for (j, &b) in bytes.iter().enumerate().skip(i + 1) {
                    match b {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = Some(j);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("unclosed ${{ in {text:?}"));
                let inner = &text[i + 2..end];
                let name_len = inner.find(|c: char| !is_name(c)).unwrap_or(inner.len());
                let (name, rest) = inner.split_at(name_len);
                let op_len = [":?", ":-", ":+", "?", "-", "+"]
                    .iter()
                    .find(|op| rest.starts_with(**op))
                    .map_or(0, |op| op.len());
                assert!(
                    op_len > 0 || rest.is_empty(),
                    "not a variable reference: ${{{inner}}} in {text:?}"
                );
                let (op, arg) = rest.split_at(op_len);
                out.push(VarRef {
                    span: i..end + 1,
                    name: name.to_string(),
                    op: op.to_string(),
                    arg: arg.to_string(),
                });
                i = end + 1;
            }
            Some(&c) if c.is_ascii_alphabetic() || c == b'_' => {
                let tail = &text[i + 1..];
                let len = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
                out.push(VarRef {
                    span: i..i + 1 + len,
                    name: tail[..len].to_string(),
                    op: String::new(),
                    arg: String::new(),
                });
                i += 1 + len;
            }
            _ => i += 1,
        }
    }
    out
}

/// `text` as compose interpolates it with `env` for the environment; panics
/// where compose would refuse to start (a required variable unset).
fn interpolate(text: &str, env: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut at = 0;
    for r in var_refs(text) {
        out.push_str(&text[at..r.span.start].replace("$$", "$"));
        let value = env
            .iter()
            .find(|(k, _)| *k == r.name)
            .map(|(_, v)| v.to_string());
        let with = match (r.op.as_str(), value) {
            (":+" | "+", Some(_)) => r.arg.clone(),
            (":+" | "+", None) => String::new(),
            (_, Some(v)) => v,
            (":-" | "-", None) => r.arg.clone(),
            (":?" | "?", None) => panic!("compose refuses: {} is unset: {}", r.name, r.arg),
            (_, None) => String::new(),
        };
        out.push_str(&with);
        at = r.span.end;
    }
    out.push_str(&text[at..].replace("$$", "$"));
    out
}

/// Whether a variable's name says it holds a secret.
fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    ["TOKEN", "PASSWORD", "SID", "SECRET"]
        .iter()
        .any(|w| name.contains(w))
}

/// Every string value in `v` (not keys: compose interpolates values only).
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(m) => m.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// A service's environment as pairs, in either of compose's two forms.
fn environment(service: &serde_json::Value) -> Vec<(String, String)> {
    match &service["environment"] {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                (k.clone(), v)
            })
            .collect(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|e| e.as_str())
            .map(|e| {
                let (k, v) = e.split_once('=').unwrap_or((e, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
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
        // As the container sees it: the required secrets set.
        let v = interpolate(&v, COMPOSE_ENV);
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
    // The engine reaches PostgreSQL with the password the postgres service
    // is given.
    let db: tokio_postgres::Config = settings
        .database
        .url
        .parse()
        .unwrap_or_else(|e| panic!("DATABASE_URL {:?}: {e}", settings.database.url));
    let password = COMPOSE_ENV
        .iter()
        .find(|(k, _)| *k == "POSTGRES_PASSWORD")
        .map(|(_, v)| *v);
    assert_eq!(
        db.get_password(),
        password.map(str::as_bytes),
        "DATABASE_URL carries POSTGRES_PASSWORD"
    );
    assert_eq!(
        interpolate(
            services["postgres"]["environment"]["POSTGRES_PASSWORD"]
                .as_str()
                .expect("postgres has a password"),
            COMPOSE_ENV
        ),
        password.unwrap_or_default(),
        "the postgres service takes POSTGRES_PASSWORD"
    );
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
    assert!(published("bridge").contains(&settings.admin.listen.port()));
    assert!(
        !published("bridge").contains(&settings.metrics.listen.port()),
        "metrics stay inside the compose network"
    );
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
        format!("bridge:{}", settings.metrics.listen.port()),
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

/// docker-compose.yml as people deploy it: secrets required, ports on
/// loopback unless opted in, engine services probed without curl, start-up
/// waiting for healthy Kafka and PostgreSQL, Prometheus data on a volume.
/// `docker compose config` checks it too where the client is installed.
#[test]
fn compose_is_hardened_as_people_deploy_it() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");

    // Secrets: required (`${VAR:?what it is}`), never defaulted.
    let mut texts = Vec::new();
    strings(&doc, &mut texts);
    let mut required = BTreeSet::new();
    for text in &texts {
        for r in var_refs(text) {
            if is_secret(&r.name) {
                assert!(
                    r.op == ":?" && !r.arg.trim().is_empty(),
                    "{text:?}: the secret {name} must be required (${{{name}:?what it is}}), not defaulted",
                    name = r.name
                );
                required.insert(r.name);
            }
        }
    }
    for want in [
        "TWILIO_ACCOUNT_SID",
        "TWILIO_AUTH_TOKEN",
        "ESE_ADMIN_TOKEN",
        "POSTGRES_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    ] {
        assert!(required.contains(want), "{want} is required: {required:?}");
    }
    for name in &required {
        assert!(
            COMPOSE_ENV.iter().any(|(k, _)| k == name),
            "COMPOSE_ENV sets {name}"
        );
    }
    // …and no secret is written into the file as a literal.
    for (name, s) in services {
        for (k, v) in environment(s) {
            if is_secret(&k) {
                assert!(
                    var_refs(&v).iter().any(|r| r.op == ":?"),
                    "{name}: {k} is a literal ({v:?}); take it from a required variable"
                );
            }
        }
    }
    let database_url = environment(&services["stages"])
        .into_iter()
        .find(|(k, _)| k == "DATABASE_URL")
        .map(|(_, v)| v)
        .expect("stages has DATABASE_URL");
    assert!(
        database_url.contains("${POSTGRES_PASSWORD:?"),
        "DATABASE_URL uses the required password: {database_url}"
    );

    // Published ports: loopback unless ESE_PUBLISH_ADDR opts in.
    const PUBLISH: &str = "${ESE_PUBLISH_ADDR:-127.0.0.1}";
    let mut published = 0;
    for (name, s) in services {
        for p in s["ports"].as_array().into_iter().flatten() {
            // `HOST_IP:HOST_PORT:CONTAINER_PORT`, or the long form's host_ip.
            let host = match p {
                serde_json::Value::String(p) => p.rsplitn(3, ':').nth(2),
                serde_json::Value::Object(m) => m.get("host_ip").and_then(|h| h.as_str()),
                _ => None,
            };
            assert!(
                matches!(host, Some(PUBLISH | "127.0.0.1")),
                "{name} publishes {p} beyond this machine; write \"{PUBLISH}:HOST_PORT:CONTAINER_PORT\""
            );
            published += 1;
        }
    }
    assert!(published >= 5, "the services publish their ports");

    // Engine services: probed by `ese healthcheck` on the port they listen
    // on, exec form, no curl or wget (the image has neither).
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).expect("Dockerfile");
    for (name, listen_key) in [
        ("bridge", "ESE__BRIDGE__LISTEN"),
        ("stages", "ESE__METRICS__LISTEN"),
        ("provider-sim", "ESE__PROVIDER_SIM__LISTEN"),
    ] {
        let s = &services[name];
        let test: Vec<&str> = s["healthcheck"]["test"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has a healthcheck with a test list"))
            .iter()
            .map(|v| v.as_str().expect("a string"))
            .collect();
        let line = test.join(" ");
        assert!(
            !line.contains("curl") && !line.contains("wget"),
            "{name}: the image has no curl or wget: {line}"
        );
        assert!(
            test.len() == 4 && test[0] == "CMD" && test[2] == "healthcheck",
            "{name}: [\"CMD\", \"/path/to/ese\", \"healthcheck\", URL]: {line}"
        );
        let copied_to = format!(" {}", test[1]);
        assert!(
            test[1].ends_with("/ese")
                && dockerfile
                    .lines()
                    .any(|l| l.starts_with("COPY") && l.trim_end().ends_with(&copied_to)),
            "{name}: {} is where the Dockerfile puts the binary",
            test[1]
        );
        let url = url::Url::parse(test[3]).unwrap_or_else(|e| panic!("{name}: {}: {e}", test[3]));
        let mut listen = environment(s)
            .into_iter()
            .find(|(k, _)| k == listen_key)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{name} sets {listen_key}"));
        let command: Vec<&str> = s["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        if let Some(i) = command.iter().position(|a| *a == "--listen") {
            listen = command[i + 1].to_string();
        }
        assert_eq!(
            url.port(),
            Some(port_of(&listen)),
            "{name} probes the port it listens on ({listen})"
        );
        assert!(
            matches!(url.host_str(), Some("127.0.0.1" | "localhost")),
            "{name} probes itself: {url}"
        );
        assert!(
            url.path().ends_with("/healthz"),
            "{name} probes a health endpoint: {url}"
        );
    }

    // Start-up waits for healthy Kafka and PostgreSQL, and whatever is
    // waited on as healthy has a healthcheck.
    for (name, s) in services {
        match &s["depends_on"] {
            serde_json::Value::Array(a) => {
                for d in a.iter().filter_map(|d| d.as_str()) {
                    assert!(
                        !matches!(d, "kafka" | "postgres"),
                        "{name} depends on {d} without waiting for it to be healthy"
                    );
                }
            }
            serde_json::Value::Object(m) => {
                for (d, how) in m {
                    let condition = how["condition"].as_str().unwrap_or("service_started");
                    if matches!(d.as_str(), "kafka" | "postgres") {
                        assert_eq!(
                            condition, "service_healthy",
                            "{name} waits for {d} to be healthy"
                        );
                    }
                    if condition == "service_healthy" {
                        let check = &services[d]["healthcheck"];
                        assert!(
                            check["test"].is_array() && check["disable"] != true,
                            "{name} waits for {d} to be healthy, so {d} has a healthcheck"
                        );
                    }
                }
            }
            serde_json::Value::Null => {}
            other => panic!("{name}: depends_on {other}"),
        }
    }
    for name in ["init", "bridge", "stages"] {
        for d in ["kafka", "postgres"] {
            assert_eq!(
                services[name]["depends_on"][d]["condition"], "service_healthy",
                "{name} waits for a healthy {d}"
            );
        }
    }

    // Prometheus keeps its TSDB on a named volume, declared at the top level.
    let data = services["prometheus"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .find_map(|v| {
            let mut parts = v.split(':');
            let (source, target) = (parts.next()?, parts.next()?);
            (target == "/prometheus").then(|| source.to_string())
        })
        .expect("prometheus mounts a volume at /prometheus");
    assert!(
        !data.starts_with('.') && !data.starts_with('/'),
        "prometheus data on a named volume, not a bind mount: {data}"
    );
    assert!(
        doc["volumes"]
            .as_object()
            .is_some_and(|v| v.contains_key(&data)),
        "{data} is declared under the top-level volumes"
    );

    // Docker's own reading of the file, where the client is installed.
    let has_compose = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_compose {
        let out = docker_compose_config(COMPOSE_ENV);
        assert!(
            out.status.success(),
            "docker compose config:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Empty counts as unset (`:?`), and beats a `.env` file.
        let without: Vec<(&str, &str)> = COMPOSE_ENV
            .iter()
            .map(|&(k, v)| (k, if k == "POSTGRES_PASSWORD" { "" } else { v }))
            .collect();
        let out = docker_compose_config(&without);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("POSTGRES_PASSWORD"),
            "compose refuses to start without POSTGRES_PASSWORD:\n{err}"
        );
    }
}

/// `docker compose config -q` on docker-compose.yml with `env` set.
fn docker_compose_config(env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new("docker");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["compose", "-f", "docker-compose.yml", "config", "-q"])
        .env_remove("ESE_PUBLISH_ADDR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run docker compose config")
}

/// A one-shot HTTP server on 127.0.0.1 answering its first request with
/// `status_line`; its URL, and the request's text once answered.
fn answer_once(status_line: &'static str) -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local address").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut request: Vec<u8> = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match std::io::Read::read(&mut stream, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let response = format!("{status_line}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        let _ = std::io::Write::write_all(&mut stream, response.as_bytes());
        let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
    });
    (format!("http://127.0.0.1:{port}/healthz"), rx)
}

/// `ese healthcheck URL --timeout T`: whether it exited 0, and its stderr.
fn ese_healthcheck(url: &str, timeout: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ese"))
        .args(["healthcheck", url, "--timeout", timeout])
        // The probe reads no configuration, so a broken one cannot fail it.
        .env("ESE__KAFKA__PARTITIONS", "not a number")
        .output()
        .expect("run ese healthcheck");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The container probe: exit 0 on 2xx only, otherwise non-zero with the
/// status or the reason on stderr.
#[test]
fn healthcheck_exits_zero_on_2xx_and_says_why_otherwise() {
    let (url, request) = answer_once("HTTP/1.1 200 OK");
    let (ok, err) = ese_healthcheck(&url, "5s");
    assert!(ok, "200 is healthy: {err}");
    let request = request
        .recv_timeout(Duration::from_secs(5))
        .expect("the probe reached the server");
    assert!(request.starts_with("GET /healthz "), "{request}");

    let (url, _request) = answer_once("HTTP/1.1 503 Service Unavailable");
    let (ok, err) = ese_healthcheck(&url, "5s");
    assert!(!ok, "503 is unhealthy: {err}");
    assert!(
        err.contains(&url) && err.contains("503"),
        "names the status: {err}"
    );

    // Nothing listens there.
    let url = format!("http://127.0.0.1:{}/healthz", free_port());
    let (ok, err) = ese_healthcheck(&url, "5s");
    assert!(!ok, "a closed port is unhealthy: {err}");
    assert!(
        err.contains(&url) && err.contains("cannot connect"),
        "says why: {err}"
    );

    // Connects, never answers: gives up at its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("local address").port();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let started = Instant::now();
    let (ok, err) = ese_healthcheck(&url, "500ms");
    assert!(!ok, "no answer is unhealthy: {err}");
    assert!(err.contains("no answer within 500ms"), "says why: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gives up at its timeout, took {:?}",
        started.elapsed()
    );
    drop(silent);
}
