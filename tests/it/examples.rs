//! Producers that are not this engine: `examples/python/produce.py`
//! (confluent-kafka and fastavro) writes a user upsert and a status
//! callback in the engine's wire format, with and without a registry.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Registry, TestApp, examples_python};

/// Runs the example against the test's topics; panics with its output on failure.
fn produce(app: &TestApp, phone: &str, sid: &str, extra: &[&str], env: &[(&str, &str)]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/produce.py");
    let out = Command::new(examples_python())
        .arg(script)
        .args(["--brokers", &app.settings.kafka.brokers])
        .args(["--users-topic", &app.topic("users.upserts")])
        .args(["--status-topic", &app.topic("webhooks.status.raw")])
        .args([
            "--phone",
            phone,
            "--message-sid",
            sid,
            "--attribute",
            "city=Paris",
        ])
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .expect("run produce.py");
    assert!(
        out.status.success(),
        "produce.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn assert_rows(app: &TestApp, phone: &str, sid: &str) {
    app.wait_for_count(
        &format!(
            "SELECT count(*) FROM users WHERE phone_e164 = '{phone}' AND attributes->>'city' = 'Paris'"
        ),
        1,
        Duration::from_secs(60),
    )
    .await;
    app.wait_for_count(
        &format!(
            "SELECT count(*) FROM delivery_receipts WHERE message_sid = '{sid}' AND message_status = 'delivered'"
        ),
        1,
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_producer_writes_single_object_records_the_stages_store() {
    let app = TestApp::spawn().await;
    let users = app.start_stage("users");
    let normalize = app.start_stage("normalize");
    // A number as a person types it: the users stage makes it E.164.
    produce(
        &app,
        "(415) 555-0123",
        "SMpy0000000000000000000000000000a1",
        &[],
        &[],
    );
    assert_rows(&app, "+14155550123", "SMpy0000000000000000000000000000a1").await;
    users.stop().await;
    normalize.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_producer_writes_confluent_framed_records_through_a_real_registry() {
    let registry = Registry::get();
    let mut doc = toml::Table::new();
    doc.insert(
        "schema-registry".into(),
        toml::toml! { url = (registry.url.clone()) username = (registry.username.clone()) }.into(),
    );
    let app = TestApp::spawn_with(doc).await;
    let password = [("SCHEMA_REGISTRY_PASSWORD", registry.password.clone())];
    let _stages =
        crate::harness::Proc::new(app.spawn_ese_piped(&["run", "users", "normalize"], &password));
    let sid = "SMpy0000000000000000000000000000b2";
    produce(
        &app,
        "+14155550124",
        sid,
        &[
            "--format",
            "confluent",
            "--registry",
            &registry.url,
            "--registry-user",
            &registry.username,
        ],
        &[("SCHEMA_REGISTRY_PASSWORD", registry.password.as_str())],
    );
    assert_rows(&app, "+14155550124", sid).await;
    // Registered under the topic-name subjects, as the engine itself would.
    let subjects: Vec<String> = ese::http::client_builder()
        .build()
        .unwrap()
        .get(format!("{}/subjects", registry.url))
        .basic_auth(&registry.username, Some(&registry.password))
        .send()
        .await
        .expect("registry answers")
        .json()
        .await
        .expect("subjects");
    assert!(
        subjects.contains(&format!("{}-value", app.topic("users.upserts"))),
        "{subjects:?}"
    );
}

/// Registers `schema` (Avro JSON text) under `subject` in the test registry.
async fn register(registry: &Registry, subject: &str, schema: &str) {
    let r = ese::http::client_builder()
        .build()
        .unwrap()
        .post(format!("{}/subjects/{subject}/versions", registry.url))
        .basic_auth(&registry.username, Some(&registry.password))
        .json(&serde_json::json!({ "schema": schema }))
        .send()
        .await
        .expect("registry answers");
    assert!(
        r.status().is_success(),
        "register {subject}: {}",
        r.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_check_tells_compatible_from_incompatible_against_a_real_registry() {
    let registry = Registry::get();
    let mut doc = toml::Table::new();
    doc.insert(
        "schema-registry".into(),
        toml::toml! { url = (registry.url.clone()) username = (registry.username.clone()) }.into(),
    );
    let app = TestApp::spawn_with(doc).await;
    let password = [("SCHEMA_REGISTRY_PASSWORD", registry.password.clone())];

    // Nothing registered for this test's topics yet: all new, exit 0.
    let (ok, out, err) = app.run_ese_with(&["schemas", "check"], &password).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!(
            "new           {}-value",
            app.topic("users.upserts")
        )),
        "{out}"
    );

    // The engine's own schema registered: compatible. An older one that
    // lacks a field the engine's requires: incompatible, exit non-zero.
    let raw = format!("{}-value", app.topic("webhooks.status.raw"));
    register(
        registry,
        &raw,
        include_str!("../../schemas/webhook_raw.v1.avsc"),
    )
    .await;
    let users = format!("{}-value", app.topic("users.upserts"));
    register(
        registry,
        &users,
        r#"{"type":"record","name":"UserUpsert","namespace":"ese","fields":[{"name":"phone","type":"string"}]}"#,
    )
    .await;
    let (ok, out, _) = app.run_ese_with(&["schemas", "check"], &password).await;
    assert!(!ok, "an incompatible subject must fail the check: {out}");
    assert!(out.contains(&format!("compatible    {raw}")), "{out}");
    assert!(out.contains(&format!("INCOMPATIBLE  {users}")), "{out}");

    // Wrong credentials: a clear error, not a verdict.
    let (ok, _, err) = app
        .run_ese_with(
            &["schemas", "check"],
            &[("SCHEMA_REGISTRY_PASSWORD", "wrong".to_string())],
        )
        .await;
    assert!(!ok && err.contains("refused the credentials"), "{err}");
}
