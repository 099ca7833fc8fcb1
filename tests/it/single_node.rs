//! `ese up` on its embedded broker keeps every promise: nothing answered 2xx
//! is lost when it is killed, a stop finishes in order, and a consumer that
//! dies gives its partitions back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{ADMIN_TOKEN, Proc, SIM_ACCOUNT, TestApp, free_port};

/// `ese up` on its own embedded broker (durable, in `data`), on free ports.
pub(crate) struct Up {
    bridge: u16,
    admin: u16,
    broker: u16,
    env: Vec<(String, String)>,
}

impl Up {
    pub(crate) fn new(data: &std::path::Path, provider: Option<&str>) -> Up {
        let (bridge, admin, broker) = (free_port(), free_port(), free_port());
        let (metrics, sim) = (free_port(), free_port());
        let mut env = vec![
            // Empty: the embedded broker (over the test config's brokers).
            ("KAFKA_BROKERS", String::new()),
            ("ESE__BROKER__LISTEN", format!("127.0.0.1:{broker}")),
            ("ESE__BROKER__DATA_DIR", data.display().to_string()),
            ("ESE__BRIDGE__LISTEN", format!("127.0.0.1:{bridge}")),
            ("ESE__ADMIN__LISTEN", format!("127.0.0.1:{admin}")),
            (
                "ESE__BRIDGE__PUBLIC_URL",
                format!("http://127.0.0.1:{bridge}"),
            ),
            ("ESE__METRICS__LISTEN", format!("127.0.0.1:{metrics}")),
            ("ESE__PROVIDER_SIM__LISTEN", format!("127.0.0.1:{sim}")),
            ("ESE_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ];
        if let Some(base) = provider {
            env.push(("ESE__PROVIDER__BASE_URL", base.to_string()));
        }
        let env = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Up {
            bridge,
            admin,
            broker,
            env,
        }
    }

    pub(crate) fn env(&self) -> Vec<(&str, String)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect()
    }

    /// Starts `ese up ARGS…` and waits until its bridge answers.
    pub(crate) async fn start(&self, app: &TestApp, args: &[&str]) -> Proc {
        let mut all = vec!["up"];
        all.extend_from_slice(args);
        let child = Proc::new(app.spawn_ese_piped(&all, &self.env()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("http://127.0.0.1:{}/healthz", self.bridge);
        let http = ese::http::client_builder().build().unwrap();
        while !http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "ese up did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        child
    }
}

/// SIGTERM, and how long the exit took and whether it succeeded.
async fn sigterm(mut p: Proc) -> (Duration, bool) {
    let pid = p.child().id().to_string();
    let started = Instant::now();
    crate::harness::signal(&pid, "-TERM");
    // Never hang the suite: after 60 s the process is killed and counted as failed.
    loop {
        if let Some(status) = p.child().try_wait().expect("wait") {
            return (started.elapsed(), status.success());
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = p.child().kill();
            let _ = p.child().wait();
            return (started.elapsed(), false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A shell command of the README: its variables and the `ese` arguments.
type ReadmeCommand = (Vec<(String, String)>, Vec<String>);

/// The commands of README.md's "Run it", as written: for each `sh` block,
/// its variables (`KEY=VALUE` before `cargo`) and the `ese` arguments
/// (after `cargo run --release --`).
fn readme_run_it() -> Vec<ReadmeCommand> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Run it\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a \"Run it\" section");
    let mut commands = Vec::new();
    for block in section.split("```sh\n").skip(1) {
        let text = block.split("```").next().unwrap_or_default();
        let line = text.replace("\\\n", " ");
        // The engine's command is the last of an `a && b` chain.
        let command = line.rsplit("&&").next().unwrap_or_default();
        let words: Vec<&str> = command.split_whitespace().collect();
        let cargo = words
            .iter()
            .position(|w| *w == "cargo")
            .unwrap_or_else(|| panic!("README command runs cargo: {command}"));
        assert_eq!(
            &words[cargo..cargo + 4],
            ["cargo", "run", "--release", "--"],
            "README: {command}"
        );
        let vars = words[..cargo]
            .iter()
            .map(|w| {
                let (k, v) = w
                    .split_once('=')
                    .unwrap_or_else(|| panic!("README: {w:?} before cargo is not KEY=VALUE"));
                (k.to_string(), v.to_string())
            })
            .collect();
        let args = words[cargo + 4..].iter().map(|w| w.to_string()).collect();
        commands.push((vars, args));
    }
    commands
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_run_it_commands_work_as_written_and_sigterm_exits_zero_quickly() {
    let commands = readme_run_it();
    assert_eq!(
        commands.len(),
        2,
        "README's Run it: the engine, then the demo"
    );
    let (up_vars, up_args) = &commands[0];
    let (demo_vars, demo_args) = &commands[1];
    assert_eq!(up_args.first().map(String::as_str), Some("up"));
    assert_eq!(demo_args.first().map(String::as_str), Some("demo"));
    assert_eq!(
        up_vars, demo_vars,
        "the same three variables in both terminals"
    );

    let app = TestApp::spawn().await;
    let data = tempdir();
    let mut up = Up::new(&data, None);
    up.env.extend(up_vars.iter().cloned());
    let rest: Vec<&str> = up_args[1..].iter().map(String::as_str).collect();
    let engine = up.start(&app, &rest).await;
    // The demo as written (only the README's variables beside the test's
    // own ports and database), against the running engine, finding its
    // broker itself.
    let args: Vec<&str> = demo_args.iter().map(String::as_str).collect();
    let (ok, out, err) = app.run_ese_with(&args, &up.env()).await;
    assert!(ok, "ese demo failed: {out}\n{err}");
    assert!(out.contains("DELIVERED"), "{out}");
    assert!(
        err.contains(&format!(
            "embedded broker of `ese up` at 127.0.0.1:{}",
            up.broker
        )),
        "demo says where it connected: {err}"
    );
    let (took, ok) = sigterm(engine).await;
    assert!(ok, "ese up exited non-zero after SIGTERM");
    assert!(
        took < Duration::from_secs(10),
        "ese up took {took:?} to stop"
    );
}

/// Posts a signed status callback to `base`; whether it was answered 2xx.
async fn post_status(http: &reqwest::Client, base: &str, sid: &str, status: &str) -> bool {
    let path = "/webhooks/twilio/status";
    let params: Vec<(String, String)> = [
        ("MessageSid", sid),
        ("MessageStatus", status),
        ("AccountSid", SIM_ACCOUNT),
        ("To", "+14155550100"),
        ("From", "+15005550006"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let signature =
        ese::twilio::signature::sign(crate::fixtures::TOKEN, &format!("{base}{path}"), &params);
    let form = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&params)
        .finish();
    http.post(format!("{base}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", signature)
        .body(form)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_killed_under_webhook_load_and_a_campaign_loses_and_repeats_nothing() {
    let app = TestApp::spawn_with(
        toml::from_str(
            r#"
            [sender]
            reconcile-after = "3s"
            pump-interval = "200ms"
            [provider]
            timeout = "1s"
            [provider-sim]
            callback-retries = 12
            sent-after = "10ms"
            delivered-after = "50ms"
            [campaigns]
            scheduler-interval = "200ms"
            "#,
        )
        .unwrap(),
    )
    .await;
    // The provider outlives the engine, so what it was sent is counted across the crash.
    let sim_port = free_port();
    let sim = ese::sim::Simulator::new(
        app.settings.provider_sim.clone(),
        SIM_ACCOUNT.to_string(),
        crate::fixtures::TOKEN.to_string(),
    )
    .expect("simulator");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", sim_port))
        .await
        .unwrap();
    let sim_stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ese::sim::serve_on(sim, listener, sim_stop.clone()));
    let sim_base = format!("http://127.0.0.1:{sim_port}");

    const RECIPIENTS: i64 = 400;
    app.seed_users(
        RECIPIENTS,
        "jsonb_build_object('plan', 'pro', 'first_name', 'U' || i)",
    )
    .await;
    let data = tempdir();
    let up = Up::new(&data, Some(&sim_base));
    let mut engine = up.start(&app, &[]).await;
    let base = format!("http://127.0.0.1:{}", up.bridge);
    let admin = format!("http://127.0.0.1:{}/api/v1", up.admin);
    let http = ese::http::client_builder().build().unwrap();

    // A campaign at 100/s: four seconds of sending, cut by the crash.
    let api = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let req = http
            .request(method.parse().unwrap(), format!("{admin}{path}"))
            .bearer_auth(ADMIN_TOKEN);
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        let path = path.to_string();
        async move {
            let r = req.send().await.expect("admin API answers");
            assert!(r.status().is_success(), "{path}: {}", r.status());
            r.json::<serde_json::Value>().await.unwrap_or_default()
        }
    };
    let t = api(
        "POST",
        "/templates",
        Some(json!({"name": "crash", "content": "Hi {first_name}"})),
    )
    .await;
    let s = api(
        "POST",
        "/segments",
        Some(json!({"name": "crash", "filter_criteria": {"attribute": "plan", "operator": "equals", "value": "pro"}})),
    )
    .await;
    let c = api(
        "POST",
        "/campaigns",
        Some(json!({"name": "crash", "template_id": t["id"], "segment_id": s["id"], "rate_limit_per_second": 100,
                        "quiet_hours_start": null, "quiet_hours_end": null})),
    )
    .await;
    let id = crate::harness::id_of(&c);
    // Without a schedule_time, ready starts it at once.
    api("POST", &format!("/campaigns/{id}/ready"), None).await;

    // Signed callbacks streaming in; kill -9 after two seconds, back after one.
    let mut accepted: BTreeMap<String, bool> = BTreeMap::new();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let sid = format!("SMcrash{i:026}");
        accepted.insert(
            sid.clone(),
            post_status(&http, &base, &sid, "delivered").await,
        );
        i += 1;
    }
    engine.kill9();
    drop(engine);
    // Nothing answers while it is down: the provider would retry those.
    for _ in 0..20 {
        let sid = format!("SMcrash{i:026}");
        accepted.insert(
            sid.clone(),
            post_status(&http, &base, &sid, "delivered").await,
        );
        i += 1;
    }
    let engine = up.start(&app, &[]).await;
    for _ in 0..200 {
        let sid = format!("SMcrash{i:026}");
        accepted.insert(
            sid.clone(),
            post_status(&http, &base, &sid, "delivered").await,
        );
        i += 1;
    }
    let answered: Vec<&String> = accepted
        .iter()
        .filter(|(_, ok)| **ok)
        .map(|(s, _)| s)
        .collect();
    assert!(
        answered.len() > 100,
        "too few webhooks answered: {}",
        answered.len()
    );

    // Every webhook answered 2xx is stored, once.
    let sids: Vec<String> = answered.iter().map(|s| s.to_string()).collect();
    let stored_sql = format!(
        "SELECT count(DISTINCT message_sid) FROM delivery_receipts WHERE message_sid = ANY(ARRAY[{}])",
        sids.iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(",")
    );
    app.wait_for_count(&stored_sql, sids.len() as i64, Duration::from_secs(90))
        .await;
    let rows = app
        .count("SELECT count(*) FROM delivery_receipts WHERE message_sid LIKE 'SMcrash%'")
        .await;
    assert_eq!(rows, sids.len() as i64, "a webhook stored twice");

    // Every campaign message was sent once and ends final.
    app.wait_for_count(
        "SELECT count(*) FROM messages WHERE status IN ('DELIVERED', 'UNDELIVERED', 'FAILED')",
        RECIPIENTS,
        Duration::from_secs(120),
    )
    .await;
    let stats: serde_json::Value = http
        .get(format!("{sim_base}/sim/stats"))
        .basic_auth(SIM_ACCOUNT, Some(crate::fixtures::TOKEN))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let per: BTreeMap<String, i64> =
        serde_json::from_value(stats["per_recipient"].clone()).unwrap();
    assert_eq!(per.len() as i64, RECIPIENTS, "every recipient reached");
    let twice: Vec<_> = per.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let (_, ok) = sigterm(engine).await;
    assert!(ok);
    sim_stop.cancel();
}

/// A fresh folder under the temp dir, removed at exit of the test binary's
/// process only by the OS: the broker's files are small.
fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ese-data-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// `ese run users` members of one group: one is killed with SIGKILL at
/// `after` from its start (joining, syncing, or stable in the group); the
/// survivors must take its partitions and finish the work within the session
/// timeout and a rebalance.
async fn a_member_killed_at(after: Duration) {
    let app = TestApp::spawn().await;
    let topic = app.topic("users.upserts");
    let produce = |from: usize, n: usize| {
        let app = &app;
        let topic = topic.clone();
        async move {
            let mut records = Vec::new();
            for i in from..from + n {
                let u = ese::records::UserUpsert {
                    consent: None,
                    event_id: None,
                    phone: format!("+1415{}", 6_000_000 + i),
                    attributes: Default::default(),
                    occurred_at: 1_700_000_000_000,
                };
                records.push((
                    u.phone.clone().into_bytes(),
                    app.codec.encode(&topic, &u).await.unwrap(),
                ));
            }
            app.produce_all(&topic, records).await;
        }
    };
    let a = Proc::new(app.spawn_ese(&["run", "users"]));
    let b = Proc::new(app.spawn_ese(&["run", "users"]));
    produce(0, 200).await;
    app.wait_for_count("SELECT count(*) FROM users", 200, Duration::from_secs(60))
        .await;
    // A third member joins; it dies at `after`, in whatever phase the group is.
    let mut c = Proc::new(app.spawn_ese(&["run", "users"]));
    tokio::time::sleep(after).await;
    c.kill9();
    let killed = Instant::now();
    produce(200, 400).await;
    // Session timeout (6 s in tests) plus a rebalance, with room.
    app.wait_for_count("SELECT count(*) FROM users", 600, Duration::from_secs(30))
        .await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the survivors took {took:?} to finish the dead member's partitions"
    );
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_while_joining_gives_its_partitions_back() {
    a_member_killed_at(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_while_syncing_gives_its_partitions_back() {
    a_member_killed_at(Duration::from_millis(1_200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_once_stable_gives_its_partitions_back() {
    a_member_killed_at(Duration::from_secs(5)).await;
}

/// Every stage under load: SIGTERM makes it finish its batches, commit its
/// offsets and exit 0 — what it processed is exactly what its group committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_under_load_exit_zero_on_sigterm_with_offsets_committed() {
    let app = TestApp::spawn().await;
    let topic = app.topic("users.upserts");
    let mut records = Vec::new();
    for i in 0..20_000 {
        let u = ese::records::UserUpsert {
            consent: None,
            event_id: None,
            phone: format!("+1415{}", 7_000_000 + i),
            attributes: Default::default(),
            occurred_at: 1_700_000_000_000,
        };
        records.push((
            u.phone.clone().into_bytes(),
            app.codec.encode(&topic, &u).await.unwrap(),
        ));
    }
    app.produce_all(&topic, records).await;
    let stage = Proc::new(app.spawn_ese(&[
        "run",
        "users",
        "normalize",
        "consent",
        "receipts",
        "fanout",
        "sender",
        "scheduler",
    ]));
    // Mid-load: some rows in, not all.
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.count("SELECT count(*) FROM users").await < 2_000 {
        assert!(Instant::now() < deadline, "the users stage did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (took, ok) = sigterm(stage).await;
    assert!(ok, "ese run exited non-zero after SIGTERM");
    assert!(took < Duration::from_secs(30), "took {took:?} to stop");
    let rows = app.count("SELECT count(*) FROM users").await;
    let p = app.settings.pipeline("users").unwrap();
    let reader = ese::kafka::TopicReader::new(&app.settings.kafka).unwrap();
    let committed: i64 = reader
        .group_offsets(&p.group_id, &topic)
        .await
        .unwrap()
        .iter()
        .map(|o| o.committed.unwrap_or(0))
        .sum();
    assert_eq!(
        committed, rows,
        "offsets committed for exactly what was processed"
    );
}
