//! The webhook bridge and the normalize stage: signed provider callbacks into
//! Kafka and the audit trail, refused when they should be, nothing lost.

use std::collections::BTreeSet;
use std::time::Duration;

use ese::records::{InboundNormalized, ReceiptNormalized};

use crate::fixtures::{self, FIXTURES, Fixture};
use crate::harness::{TestApp, kill9};

const STATUS: &str = "/webhooks/twilio/status";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realistic_callbacks_reach_the_audit_trail_once() {
    let app = TestApp::spawn().await;
    let bridge = app.start_bridge().await;
    // Every fixture twice: the provider retries.
    for _ in 0..2 {
        for f in FIXTURES {
            let r = bridge.deliver(f).await;
            assert_eq!(r.status(), 200, "{}", f.name);
            if f.path.ends_with("inbound") {
                assert_eq!(r.headers()["content-type"], "text/xml");
                assert!(r.text().await.unwrap().contains("<Response/>"));
            }
        }
    }
    let stage = app.start_stage("normalize");
    app.wait_for_count(
        "SELECT count(*) FROM delivery_receipts",
        6,
        Duration::from_secs(60),
    )
    .await;
    app.wait_for_count(
        "SELECT count(*) FROM inbound_events",
        2,
        Duration::from_secs(60),
    )
    .await;
    let c = app.pool.get().await.unwrap();
    let row = c
        .query_one(
            "SELECT message_status, error_code, phone_valid FROM delivery_receipts WHERE message_sid = 'SM00000000000000000000000000000002'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "undelivered");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(30003));
    assert!(row.get::<_, bool>(2));
    // The audit rows' ids are the data model's UUIDs, version 7 (time-ordered).
    for table in ["delivery_receipts", "inbound_events"] {
        let ids: Vec<uuid::Uuid> = c
            .query(&format!("SELECT id FROM {table}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!ids.is_empty(), "{table}");
        for id in ids {
            assert_eq!(id.get_version_num(), 7, "{table}: {id}");
        }
    }
    let row = c
        .query_one(
            "SELECT message_status, raw_payload->>'EventType', raw_payload->>'ChannelPrefix', raw_payload->>'ChannelInstallSid'
               FROM delivery_receipts WHERE message_sid = 'SM00000000000000000000000000000004'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "read");
    assert_eq!(row.get::<_, String>(1), "READ");
    assert_eq!(row.get::<_, String>(2), "whatsapp");
    assert_eq!(
        row.get::<_, String>(3),
        "XE0123456789abcdef0123456789abcdef"
    );
    let statuses: Vec<String> = c
        .query(
            "SELECT message_status FROM delivery_receipts WHERE message_sid = 'SM00000000000000000000000000000001' ORDER BY received_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["queued", "sent", "delivered"]);
    // Every parameter kept, as sent.
    let params: i64 = c
        .query_one(
            "SELECT count(*) FROM delivery_receipts d, jsonb_object_keys(d.raw_payload) WHERE message_sid = 'SM00000000000000000000000000000003'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(params as usize, Fixture::by_name("sms_failed").params.len());

    let row = c
        .query_one(
            "SELECT from_phone, channel, body, processing_status, raw_payload->>'FromCity' FROM inbound_events WHERE message_sid = 'SM00000000000000000000000000000010'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "+14155552671");
    assert_eq!(row.get::<_, String>(1), "SMS");
    assert_eq!(row.get::<_, String>(2), "Hello there");
    assert_eq!(row.get::<_, String>(3), "PENDING");
    assert_eq!(row.get::<_, String>(4), "SAN FRANCISCO");
    let row = c
        .query_one(
            "SELECT from_phone, channel, raw_payload->>'ProfileName', raw_payload->>'MediaUrl0', raw_payload->>'WaId'
               FROM inbound_events WHERE message_sid = 'MM00000000000000000000000000000011'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "+447911123456");
    assert_eq!(row.get::<_, String>(1), "WHATSAPP");
    assert_eq!(row.get::<_, String>(2), "Ada");
    assert!(
        row.get::<_, String>(3)
            .ends_with("/Media/ME0123456789abcdef0123456789abcdef")
    );
    assert_eq!(row.get::<_, String>(4), "447911123456");

    // The next stages' topics: normalized, keyed, one distinct event per callback.
    let receipts = app.read_topic(
        &app.topic("receipts.normalized"),
        12,
        Duration::from_secs(30),
    );
    assert_eq!(receipts.len(), 12, "each delivery emitted downstream");
    let mut events = BTreeSet::new();
    for r in &receipts {
        let rec: ReceiptNormalized = app
            .codec
            .decode(r.payload.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(r.key.as_deref(), Some(rec.message_sid.as_bytes()));
        if rec.message_sid.ends_with('2') {
            assert_eq!(
                (rec.status.as_str(), rec.error_code),
                ("undelivered", Some(30003))
            );
        }
        if rec.message_sid.ends_with('4') {
            assert_eq!(rec.channel, "WHATSAPP");
            assert_eq!(rec.recipient.as_deref(), Some("+14155552671"));
        }
        events.insert(rec.event_id);
    }
    assert_eq!(events.len(), 6, "a provider retry keeps its event id");
    let inbound = app.read_topic(&app.topic("inbound.normalized"), 4, Duration::from_secs(30));
    assert_eq!(inbound.len(), 4);
    for r in &inbound {
        let rec: InboundNormalized = app
            .codec
            .decode(r.payload.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(r.key.as_deref(), Some(rec.from.as_bytes()));
        if rec.channel == "WHATSAPP" {
            assert_eq!(rec.num_media, 1);
            assert_eq!(rec.profile_name.as_deref(), Some("Ada"));
        }
    }
    stage.stop().await;

    // Replay from earliest (a fresh group reads everything again): no new rows.
    let mut replay = app.deps();
    if let Some(p) = replay.settings.pipelines.get_mut("normalize") {
        p.group_id = format!("{}.replay", p.group_id);
    }
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    let handle = tokio::spawn(async move { ese::stages::run("normalize", replay, t).await });
    let again = app.read_topic(
        &app.topic("receipts.normalized"),
        24,
        Duration::from_secs(60),
    );
    assert_eq!(again.len(), 24, "the replay ran through");
    token.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(app.count("SELECT count(*) FROM delivery_receipts").await, 6);
    assert_eq!(app.count("SELECT count(*) FROM inbound_events").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_get_403_and_produce_nothing() {
    let app = TestApp::spawn().await;
    let bridge = app.start_bridge().await;
    let sent = Fixture::by_name("sms_sent");
    let form = |pairs: Vec<(&str, &str)>| {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    };
    let tampered: Vec<(&str, &str)> = sent
        .params
        .iter()
        .map(|&(k, v)| {
            if k == "MessageStatus" {
                (k, "delivered")
            } else {
                (k, v)
            }
        })
        .collect();
    let dropped: Vec<(&str, &str)> = sent
        .params
        .iter()
        .copied()
        .filter(|(k, _)| *k != "ApiVersion")
        .collect();
    let cases = [
        ("tampered value", form(tampered), Some(sent.signature)),
        ("dropped parameter", form(dropped), Some(sent.signature)),
        (
            "wrong url",
            sent.form(),
            Some(fixtures::SENT_SIGNED_FOR_OTHER_URL),
        ),
        (
            "wrong token",
            sent.form(),
            Some(fixtures::SENT_SIGNED_WITH_OTHER_TOKEN),
        ),
        ("missing", sent.form(), None),
    ];
    for (what, body, sig) in cases {
        let r = bridge.post_form(STATUS, body, sig).await;
        assert_eq!(r.status(), 403, "{what}");
    }
    // JSON variant with a body that is not the one hashed.
    let r = bridge
        .http
        .post(format!(
            "{}{STATUS}?bodySHA256={}",
            bridge.base,
            fixtures::JSON_BODY_SHA256
        ))
        .header("content-type", "application/json")
        .header("x-twilio-signature", fixtures::JSON_SIGNATURE)
        .body(fixtures::JSON_BODY.replace("delivered", "failed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "json body tampered");
    let produced = app.read_topic(&app.topic("webhooks.status.raw"), 1, Duration::from_secs(3));
    assert!(produced.is_empty(), "nothing produced for refused requests");

    // Accepted: the same parameters in another order, an unknown parameter
    // (signed), and the JSON variant.
    let mut reordered: Vec<(&str, &str)> = sent.params.to_vec();
    reordered.reverse();
    assert_eq!(
        bridge
            .post_form(STATUS, form(reordered), Some(sent.signature))
            .await
            .status(),
        200
    );
    let mut extra: Vec<(&str, &str)> = sent.params.to_vec();
    extra.push(("BrandNewParam", "x"));
    assert_eq!(
        bridge
            .post_form(
                STATUS,
                form(extra),
                Some(fixtures::SENT_WITH_UNKNOWN_PARAM_SIGNATURE)
            )
            .await
            .status(),
        200
    );
    let r = bridge
        .http
        .post(format!(
            "{}{STATUS}?bodySHA256={}",
            bridge.base,
            fixtures::JSON_BODY_SHA256
        ))
        .header("content-type", "application/json")
        .header("x-twilio-signature", fixtures::JSON_SIGNATURE)
        .body(fixtures::JSON_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "json variant");
    let produced = app.read_topic(
        &app.topic("webhooks.status.raw"),
        3,
        Duration::from_secs(20),
    );
    assert_eq!(produced.len(), 3);

    // This process's metrics (what `metrics.listen` serves).
    let metrics = ese::metrics::handle().render();
    let mismatches: f64 = metrics
        .lines()
        .find(|l| l.starts_with("ese_bridge_signature_failures_total{reason=\"mismatch\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("signature failure counter exported");
    assert!(mismatches >= 4.0, "{mismatches}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_413_415_400_and_503() {
    let mut extra = toml::Table::new();
    extra.insert(
        "bridge".into(),
        toml::toml! { max-body-bytes = 2048 }.into(),
    );
    let app = TestApp::spawn_with(extra).await;
    let bridge = app.start_bridge().await;
    let sent = Fixture::by_name("sms_sent");

    let big = format!("{}&Padding={}", sent.form(), "x".repeat(4096));
    assert_eq!(
        bridge
            .post_form(STATUS, big, Some(sent.signature))
            .await
            .status(),
        413
    );

    let r = bridge
        .http
        .post(format!("{}{STATUS}", bridge.base))
        .header("content-type", "text/plain")
        .header("x-twilio-signature", sent.signature)
        .body(sent.form())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    // Correctly signed but without MessageStatus: 400 naming it.
    let params: Vec<(String, String)> = sent
        .params
        .iter()
        .filter(|(k, _)| *k != "MessageStatus")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sig = ese::twilio::signature::sign(
        fixtures::TOKEN,
        &format!("{}{STATUS}", fixtures::PUBLIC_URL),
        &params,
    );
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let r = bridge.post_form(STATUS, body, Some(&sig)).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("MessageStatus"));

    // No room in flight: 503 with Retry-After.
    let mut settings = app.settings.clone();
    settings.bridge.max_in_flight = 0;
    let (addr, token) = serve_with(&app, &settings).await;
    let r = ese::http::client_builder()
        .build()
        .unwrap()
        .post(format!("http://{addr}{STATUS}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sent.signature)
        .body(sent.form())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    token.cancel();

    let produced = app.read_topic(&app.topic("webhooks.status.raw"), 1, Duration::from_secs(3));
    assert!(produced.is_empty(), "nothing produced for refused requests");
}

/// `ese broker` as a child process, killed when dropped (also on panic).
struct BrokerProcess(std::process::Child);

impl BrokerProcess {
    fn start(port: u16) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ese"))
            .args(["broker", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ese broker");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self(child)
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.signal("-CONT");
        kill9(&mut self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_means_503_and_nothing_lost_or_doubled_after_retry() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = BrokerProcess::start(port);
    let mut kafka = toml::Table::new();
    kafka.insert("brokers".into(), format!("127.0.0.1:{port}").into());
    let mut extra = toml::Table::new();
    extra.insert("kafka".into(), kafka.into());
    let app = TestApp::spawn_with(extra).await;
    let bridge = app.start_bridge().await;

    assert_eq!(
        bridge.deliver(Fixture::by_name("sms_sent")).await.status(),
        200
    );
    // The broker stops answering (frozen): the bridge must not say 2xx.
    broker.signal("-STOP");
    let delivered = Fixture::by_name("sms_delivered");
    let r = bridge.deliver(delivered).await;
    assert_eq!(r.status(), 503, "broker down: the provider must retry");
    assert!(r.headers().contains_key("retry-after"));
    broker.signal("-CONT");

    // The provider retries until accepted. The refused attempt may still have
    // reached the topic; it carries the same event id, so Postgres keeps one.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = bridge.deliver(delivered).await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            std::time::Instant::now() < deadline,
            "never accepted after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stage = app.start_stage("normalize");
    app.wait_for_count(
        "SELECT count(*) FROM delivery_receipts",
        2,
        Duration::from_secs(60),
    )
    .await;
    app.wait_caught_up("normalize", Duration::from_secs(60))
        .await;
    stage.stop().await;
    let c = app.pool.get().await.unwrap();
    let statuses: Vec<String> = c
        .query(
            "SELECT message_status FROM delivery_receipts ORDER BY message_status",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        statuses,
        ["delivered", "sent"],
        "each accepted webhook exactly once"
    );
}

/// `/readyz`: 200 once the broker (with the bridge's producer holding its
/// producer id) and PostgreSQL answer; 503 naming Kafka when the broker is
/// unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_whether_the_broker_and_postgres_answer() {
    let app = TestApp::spawn().await;
    let bridge = app.start_bridge().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let r = bridge
            .http
            .get(format!("{}/readyz", bridge.base))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break r.json::<serde_json::Value>().await.unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["kafka"], "ok");
    assert_eq!(body["postgres"], "ok");

    let mut settings = app.settings.clone();
    settings.kafka.brokers = format!("127.0.0.1:{}", crate::harness::free_port());
    let (addr, token) = serve_with(&app, &settings).await;
    let r = bridge
        .http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["kafka"], "unavailable", "no raw error text: {body}");
    assert_eq!(body["postgres"], "ok");
    // Polled hard, it checks once at a time and shares the answer: 200
    // callers at once are all answered within about one check (~2 s), not
    // 200 checks' worth.
    let started = std::time::Instant::now();
    let calls = (0..200).map(|_| {
        let (http, url) = (bridge.http.clone(), format!("http://{addr}/readyz"));
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap(), 503);
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "200 readiness polls took {:?}",
        started.elapsed()
    );
    token.cancel();
}

/// A bridge with `settings` on a free port; its address and stop token.
async fn serve_with(
    app: &TestApp,
    settings: &ese::config::Settings,
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let bridge =
        ese::bridge::Bridge::new(settings, vec![fixtures::TOKEN.into()], app.pool.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ese::bridge::serve_on(
        listener,
        bridge.router(),
        ese::bridge::Limits::of(&settings.bridge),
        token.clone(),
    ));
    (addr, token)
}

/// 2,000 clients that connect and then stall or trickle (a head never
/// finished, a body announced and never sent, a body a byte at a time) take
/// no in-flight slot: signed webhooks arriving meanwhile are all answered
/// 200, quickly. The stalled ones are cut off by `bridge.read-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_trickling_clients_do_not_starve_real_webhooks() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with(
        toml::from_str(
            r#"
            [bridge]
            max-in-flight = 256
            read-timeout = "4s"
            "#,
        )
        .unwrap(),
    )
    .await;
    let bridge = app.start_bridge().await;
    let addr = bridge.base.trim_start_matches("http://").to_string();
    let f = &FIXTURES[0];
    // Warm the producer up.
    assert_eq!(bridge.deliver(f).await.status(), 200);

    let stop = tokio_util::sync::CancellationToken::new();
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..2000usize {
        let (addr, stop) = (addr.clone(), stop.clone());
        slow.spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                return;
            };
            let head = format!(
                "POST {STATUS} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 1000\r\n"
            );
            let _ = match i % 3 {
                // The head, unfinished.
                0 => s.write_all(&head.as_bytes()[..head.len() / 2]).await,
                // The head, and a body that never comes.
                1 => s.write_all(format!("{head}\r\n").as_bytes()).await,
                // The body a byte at a time.
                _ => {
                    let _ = s.write_all(format!("{head}\r\n").as_bytes()).await;
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                                if s.write_all(b"a").await.is_err() { break; }
                            }
                        }
                    }
                    Ok(())
                }
            };
            stop.cancelled().await;
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Real webhooks meanwhile, 400 of them, 16 at a time.
    let mut took = Vec::new();
    for _ in 0..25 {
        let calls = (0..16).map(|_| async {
            let started = std::time::Instant::now();
            let status = bridge.deliver(f).await.status();
            (status, started.elapsed())
        });
        for (status, elapsed) in futures::future::join_all(calls).await {
            assert_eq!(
                status, 200,
                "a real webhook refused while slow clients wait"
            );
            took.push(elapsed);
        }
    }
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    assert!(
        p99 < Duration::from_millis(100),
        "p99 {p99:?} with 2,000 slow clients"
    );
    stop.cancel();
    while slow.join_next().await.is_some() {}
}
