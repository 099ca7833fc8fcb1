//! The `users` stage, and through it the stage runner: batches, merge rules,
//! at-least-once under SIGKILL, poison records, Postgres loss, scale-out.

use std::collections::BTreeMap;
use std::time::Duration;

use ese::stages::users::UserUpsert;
use serde_json::json;

use crate::harness::{TestApp, kill9};

/// A valid US number unique to `i`.
fn phone(i: usize) -> String {
    format!("+1415{:03}{:04}", 200 + i / 10_000, i % 10_000)
}

async fn upsert(app: &TestApp, phone: &str, attrs: serde_json::Value, at: i64) -> Vec<u8> {
    let attributes: BTreeMap<String, serde_json::Value> = attrs
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let u = UserUpsert {
        consent: None,
        event_id: None,
        phone: phone.to_string(),
        attributes,
        occurred_at: at,
    };
    app.codec
        .encode(&app.topic("users.upserts"), &u)
        .await
        .unwrap()
}

/// `n` users, each sent twice: a first profile, then a second event adding a key.
async fn two_events_each(app: &TestApp, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut records = Vec::with_capacity(2 * n);
    for i in 0..n {
        let p = phone(i);
        let first = upsert(
            app,
            &p,
            json!({"name": format!("user {i}"), "tier": "basic"}),
            1_000,
        )
        .await;
        let second = upsert(app, &p, json!({"tier": "gold", "n": i as i64}), 2_000).await;
        records.push((p.clone().into_bytes(), first));
        records.push((p.into_bytes(), second));
    }
    records
}

async fn assert_merged(app: &TestApp, n: usize) {
    let c = app.pool.get().await.unwrap();
    let rows = c
        .query("SELECT phone_e164, attributes FROM users", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), n);
    let by_phone: BTreeMap<String, serde_json::Value> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for i in (0..n).step_by(97) {
        assert_eq!(
            by_phone[&phone(i)],
            json!({"name": format!("user {i}"), "tier": "gold", "n": i as i64}),
            "user {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_upserts_become_ten_thousand_merged_rows() {
    let app = TestApp::spawn().await;
    let n = 10_000;
    let records = two_events_each(&app, n).await;
    app.produce_all(&app.topic("users.upserts"), records).await;
    let stage = app.start_stage("users");
    wait_second_events(&app, n).await;
    stage.stop().await;
    assert_merged(&app, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_event_never_overwrites_newer_data() {
    let app = TestApp::spawn().await;
    let topic = app.topic("users.upserts");
    let p = "+14155552671";
    // Newer first, then an older one touching the same key and a new key,
    // then a replay of the newer one and a different spelling of the number.
    let newer = upsert(&app, p, json!({"city": "Paris", "lang": "fr"}), 5_000).await;
    let older = upsert(
        &app,
        "(415) 555-2671",
        json!({"city": "Lyon", "age": 30}),
        1_000,
    )
    .await;
    let newest = upsert(&app, "+1 415 555 2671", json!({"lang": "en"}), 9_000).await;
    for payload in [&newer, &older, &newer, &newest] {
        app.produce(&topic, p.as_bytes(), payload).await;
    }
    let stage = app.start_stage("users");
    app.wait_for_count(
        "SELECT count(*) FROM users WHERE attributes->>'lang' = 'en'",
        1,
        Duration::from_secs(60),
    )
    .await;
    stage.stop().await;
    let c = app.pool.get().await.unwrap();
    let row = c
        .query_one("SELECT attributes FROM users WHERE phone_e164 = $1", &[&p])
        .await
        .unwrap();
    let attrs: serde_json::Value = row.get(0);
    // city stays Paris (newer), age arrives (no newer value), lang is the newest.
    assert_eq!(attrs, json!({"city": "Paris", "lang": "en", "age": 30}));
    assert_eq!(app.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dlq_with_headers_and_the_stage_goes_on() {
    let app = TestApp::spawn().await;
    let topic = app.topic("users.upserts");
    app.produce(&topic, b"garbage", b"this is not avro").await;
    let bad_phone = upsert(&app, "call me maybe", json!({"x": 1}), 1_000).await;
    app.produce(&topic, b"bad-phone", &bad_phone).await;
    let good = upsert(&app, "+14155552671", json!({"ok": true}), 1_000).await;
    app.produce(&topic, b"good", &good).await;

    let stage = app.start_stage("users");
    app.wait_for_count("SELECT count(*) FROM users", 1, Duration::from_secs(60))
        .await;
    let dead = app.read_topic(&app.topic("dlq.users"), 2, Duration::from_secs(30));
    stage.stop().await;

    assert_eq!(dead.len(), 2, "both poison records dead-lettered");
    let garbage = dead
        .iter()
        .find(|r| r.key.as_deref() == Some(b"garbage"))
        .expect("undecodable record in the DLQ");
    assert_eq!(garbage.payload.as_deref(), Some(&b"this is not avro"[..]));
    assert!(garbage.header("ese.error").unwrap().contains("undecodable"));
    assert_eq!(garbage.header("ese.stage"), Some("users"));
    assert_eq!(garbage.header("ese.source.topic"), Some(topic.as_str()));
    assert!(garbage.header("ese.source.partition").is_some());
    assert!(garbage.header("ese.source.offset").is_some());
    assert!(garbage.header("ese.failed-at").is_some());
    let phone = dead
        .iter()
        .find(|r| r.key.as_deref() == Some(b"bad-phone"))
        .expect("invalid phone in the DLQ");
    assert!(
        phone.header("ese.error").unwrap().contains("call me maybe"),
        "reason names the input: {:?}",
        phone.header("ese.error")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let mut extra = toml::Table::new();
    extra.insert(
        "pipelines".into(),
        toml::toml! { [users] batch-size = 200 }.into(),
    );
    let app = TestApp::spawn_with(extra).await;
    let n = 6_000;
    let records = two_events_each(&app, n).await;
    app.produce_all(&app.topic("users.upserts"), records).await;

    let mut child = app.spawn_ese(&["run", "users"]);
    // Kill it once it is visibly mid-stream.
    wait_rows(&app, 500).await;
    kill9(&mut child);
    let at_kill = app.count(SECOND_SEEN).await;
    assert!(at_kill < n as i64, "killed before the end ({at_kill})");

    let mut child = app.spawn_ese(&["run", "users"]);
    wait_second_events(&app, n).await;
    kill9(&mut child);
    assert_merged(&app, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_lost_repeatedly_nothing_lost() {
    let mut extra = toml::Table::new();
    extra.insert(
        "pipelines".into(),
        toml::toml! { [users] batch-size = 100 }.into(),
    );
    let app = TestApp::spawn_with(extra).await;
    let n = 4_000;
    let records = two_events_each(&app, n).await;
    app.produce_all(&app.topic("users.upserts"), records).await;
    let stage = app.start_stage("users");
    let mut killed = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        killed += app.kill_db_connections().await;
    }
    assert!(killed > 0, "connections were terminated");
    wait_second_events(&app, n).await;
    stage.stop().await;
    assert_merged(&app, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_share_the_work() {
    let app = TestApp::spawn().await;
    let n = 5_000;
    let records = two_events_each(&app, n).await;
    let a = app.start_stage("users");
    let b = app.start_stage("users");
    app.produce_all(&app.topic("users.upserts"), records).await;
    wait_second_events(&app, n).await;
    a.stop().await;
    b.stop().await;
    assert_merged(&app, n).await;
}

/// A test app on the broker at `port` with `n` users' two upserts each
/// already on the topic; small fetches and a small fetch queue, so the stage
/// needs the broker all along.
async fn app_on_broker(port: u16, n: usize) -> TestApp {
    let extra: toml::Table = toml::from_str(&format!(
        "[kafka]\nbrokers = \"127.0.0.1:{port}\"\n[pipelines.users]\nbatch-size = 50\n\
         [pipelines.users.consumer-options]\n\"queued.min.messages\" = \"20\"\n\
         \"max.partition.fetch.bytes\" = \"4096\""
    ))
    .unwrap();
    let app = TestApp::spawn_with(extra).await;
    let records = two_events_each(&app, n).await;
    app.produce_all(&app.topic("users.upserts"), records).await;
    app
}

/// Users whose second event (the one adding `n`) is stored.
const SECOND_SEEN: &str = "SELECT count(*) FROM users WHERE attributes ? 'n'";

/// Waits until every one of `n` users has its second event stored.
async fn wait_second_events(app: &TestApp, n: usize) {
    app.wait_for_count(SECOND_SEEN, n as i64, Duration::from_secs(180))
        .await;
}

/// Waits until the stage has visibly started (`rows` users stored).
async fn wait_rows(app: &TestApp, rows: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while app.count("SELECT count(*) FROM users").await < rows {
        assert!(
            std::time::Instant::now() < deadline,
            "stage made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_frozen_longer_than_the_session_timeout_then_resumed_loses_nothing() {
    // A broker of its own, in a child process, so it can be frozen.
    let port = crate::harness::free_port();
    let mut broker = crate::harness::spawn_broker(port, "memory://frozen/");
    let pid = broker.child().id().to_string();
    let n = 6_000;
    let app = app_on_broker(port, n).await;
    let stage = app.start_stage("users");
    wait_rows(&app, 500).await;
    // Frozen for longer than the 6 s session timeout, then resumed.
    let signal = |sig: &str| crate::harness::signal(&pid, sig);
    signal("-STOP");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = app.count(SECOND_SEEN).await;
    signal("-CONT");
    assert!(during < n as i64, "frozen before the end ({during})");
    wait_second_events(&app, n).await;
    app.wait_caught_up("users", Duration::from_secs(120)).await;
    stage.stop().await;
    assert_merged(&app, n).await;
    broker.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_on_durable_storage_loses_nothing() {
    let port = crate::harness::free_port();
    let db = crate::harness::BrokerDb::new();
    let storage = db.storage();
    let mut broker = crate::harness::spawn_broker(port, &storage);
    let n = 3_000;
    let app = app_on_broker(port, n).await;
    let mut stage = app.spawn_ese(&["run", "users"]);
    wait_rows(&app, 300).await;
    // kill -9 mid-stream, down for two seconds, back on the same storage.
    broker.kill9();
    let during = app.count(SECOND_SEEN).await;
    assert!(during < n as i64, "killed before the end ({during})");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut broker = crate::harness::spawn_broker(port, &storage);
    wait_second_events(&app, n).await;
    kill9(&mut stage);
    assert_merged(&app, n).await;
    broker.kill9();
}
