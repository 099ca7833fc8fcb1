//! On Apache Kafka only (`scripts/kafka up --brokers 3 --sasl-ssl`): secured
//! connections as cloud services run them, and a broker lost under load.

use std::time::{Duration, Instant};

use crate::harness::{Cluster, Loop, Proc, TestApp};
use crate::reliability::{Load, text_in};

/// The environment that points an `ese` child at the cluster's SASL_SSL
/// listener with `mechanism`, trusting `ca`, with `password`.
fn secured(mechanism: &str, ca: &str, password: &str) -> Vec<(&'static str, String)> {
    let c = Cluster::get();
    vec![
        ("KAFKA_BROKERS", c.sasl_ssl_brokers.clone()),
        ("ESE__KAFKA__SECURITY_PROTOCOL", "SASL_SSL".into()),
        ("ESE__KAFKA__SASL_MECHANISM", mechanism.into()),
        ("ESE__KAFKA__SASL_USERNAME", Cluster::USER.into()),
        ("ESE__KAFKA__SSL_CA_FILE", ca.into()),
        ("KAFKA_SASL_PASSWORD", password.into()),
    ]
}

/// A test app whose own clients use the cluster's PLAINTEXT listener.
async fn app_on_cluster(extra: &str) -> TestApp {
    let doc: toml::Table = toml::from_str(&format!(
        "[kafka]\nbrokers = \"{}\"\n{extra}",
        Cluster::get().brokers
    ))
    .expect("config");
    TestApp::spawn_with(doc).await
}

fn upsert(i: usize) -> ese::records::UserUpsert {
    ese::records::UserUpsert {
        consent: None,
        event_id: Some(format!("e{i}")),
        phone: format!("+1415{}", 3_000_000 + i),
        attributes: [("n".to_string(), serde_json::json!(i as i64))].into(),
        occurred_at: 1_700_000_000_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_runs_over_sasl_ssl_with_each_mechanism() {
    let cluster = Cluster::get();
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let app = app_on_cluster("").await;
        let env = secured(mechanism, &cluster.ca, Cluster::PASSWORD);
        let topic = app.topic("users.upserts");
        let mut records = Vec::new();
        for i in 0..200 {
            let u = upsert(i);
            records.push((
                u.phone.clone().into_bytes(),
                app.codec.encode(&topic, &u).await.unwrap(),
            ));
        }
        records.push((b"poison".to_vec(), b"not avro".to_vec()));
        app.produce_all(&topic, records).await;
        let stage = Proc::new(app.spawn_ese_piped(&["run", "users"], &env));
        // Consumed, committed and dead-lettered over SASL_SSL.
        app.wait_for_count("SELECT count(*) FROM users", 200, Duration::from_secs(60))
            .await;
        let dlq = app.read_topic(&app.topic("dlq.users"), 1, Duration::from_secs(30));
        assert_eq!(dlq.len(), 1, "{mechanism}: the poison record dead-lettered");
        app.wait_caught_up("users", Duration::from_secs(30)).await;
        stage.terminate().await;
        // Status over SASL_SSL shows the group, never the password.
        let (ok, out, err) = app.run_ese_with(&["status"], &env).await;
        assert!(ok, "{mechanism}: ese status: {err}");
        assert!(out.contains("users"), "{out}");
        assert!(
            !out.contains(Cluster::PASSWORD) && !err.contains(Cluster::PASSWORD),
            "the SASL password was shown"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_an_untrusted_certificate_fails_at_once_naming_the_broker() {
    let cluster = Cluster::get();
    let app = app_on_cluster("").await;
    let other_ca = std::path::Path::new(&cluster.ca)
        .with_file_name("other-ca.crt")
        .to_string_lossy()
        .into_owned();
    let broker = cluster
        .sasl_ssl_brokers
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let cases = [
        (
            secured("SCRAM-SHA-512", &cluster.ca, "not-the-password"),
            "Authentication failed",
        ),
        (
            secured("PLAIN", &cluster.ca, "not-the-password"),
            "Authentication failed",
        ),
        (
            secured("SCRAM-SHA-256", &other_ca, Cluster::PASSWORD),
            "certificate verify failed",
        ),
    ];
    for (env, cause) in cases {
        let started = Instant::now();
        let (ok, _, err) = app.run_ese_with(&["run", "users"], &env).await;
        let took = started.elapsed();
        assert!(!ok, "ese run users succeeded with {env:?}");
        assert!(
            err.contains(&broker) && err.contains(cause),
            "{cause} naming {broker}: {err}"
        );
        assert!(
            took < Duration::from_secs(20),
            "took {took:?}: a retry loop?"
        );
        assert!(!err.contains(Cluster::PASSWORD) && !err.contains("not-the-password"));
    }
}

/// Per stage: (records on its inputs, records its group has committed),
/// summed over partitions; None while the cluster cannot tell.
async fn progress(app: &TestApp, stage: &str) -> Option<(i64, i64)> {
    let p = app.settings.pipeline(stage).ok()?;
    let reader = ese::kafka::TopicReader::new(&app.settings.kafka).ok()?;
    let (mut end, mut done) = (0, 0);
    for t in &p.inputs {
        for o in reader.group_offsets(&p.group_id, t).await.ok()? {
            end += o.end;
            done += o.committed.unwrap_or(0);
        }
    }
    Some((end, done))
}

const STAGES: [&str; 5] = ["normalize", "receipts", "consent", "fanout", "sender"];

/// Per stage, the records on its inputs now.
async fn ends(app: &TestApp) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for s in STAGES {
        out.push((s, progress(app, s).await.map_or(0, |p| p.0)));
    }
    out
}

/// How long after `since` each stage had committed every record that was
/// on its inputs at `since` (`ends`): the time it took to resume.
async fn resumed(app: &TestApp, since: Instant, ends: &[(&'static str, i64)]) -> Vec<String> {
    let mut out = Vec::new();
    for (stage, end) in ends {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if progress(app, stage)
                .await
                .is_some_and(|(_, done)| done >= *end)
            {
                out.push(format!("{stage} {:.1}s", since.elapsed().as_secs_f64()));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{stage} did not resume within 90 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_lost_under_load_lose_nothing() {
    let cluster = Cluster::get();
    let l = Loop::start(&format!(
        "{}\n[kafka]\nbrokers = \"{}\"\nreplication-factor = 3\nmin-insync-replicas = 2\n",
        Loop::SOME_UNDELIVERED,
        cluster.brokers
    ))
    .await;
    let topics = l.app.settings.all_topics();
    let load = Load::start(&l).await;
    let outages = async {
        let mut report = Vec::new();
        // The broker leading the most partitions, killed and later back.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let led = cluster.leaders(&topics);
        let busiest = *led.iter().max_by_key(|(_, n)| **n).expect("leaders").0;
        let (at, killed) = (ends(&l.app).await, Instant::now());
        tokio::task::block_in_place(|| cluster.kill(busiest));
        let took = resumed(&l.app, killed, &at).await;
        report.push(format!(
            "broker {busiest} (leading {led:?}) killed: caught up {took:?}"
        ));
        tokio::task::block_in_place(|| cluster.start(busiest));
        // Then the active controller.
        let controller = tokio::task::block_in_place(|| cluster.controller());
        let (at, killed) = (ends(&l.app).await, Instant::now());
        tokio::task::block_in_place(|| cluster.kill(controller));
        let took = resumed(&l.app, killed, &at).await;
        report.push(format!(
            "controller {controller} killed: caught up {took:?}"
        ));
        tokio::task::block_in_place(|| cluster.start(controller));
        report
    };
    let (accepted, report) = tokio::join!(text_in(&l), outages);
    for line in &report {
        println!("broker loss: {line}");
    }
    load.assert_nothing_lost(&l, accepted).await;
}
