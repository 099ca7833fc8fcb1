//! The Kafka plumbing against the broker: end offsets and reads that replay,
//! status and fan-out resume rely on.

use std::time::Duration;

use ese::kafka::TopicReader;
use rdkafka::producer::FutureRecord;

use crate::harness::TestApp;

/// Produces `(key, payload)` records in one go (one batch per partition).
async fn produce_batch(app: &TestApp, topic: &str, records: &[(String, String)]) {
    let records = records
        .iter()
        .map(|(k, v)| {
            FutureRecord::to(topic)
                .key(k.as_bytes())
                .payload(v.as_bytes())
        })
        .collect();
    app.producer
        .send_all(records, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_offsets_count_every_record_of_every_batch() {
    let app = TestApp::spawn().await;
    let topic = app.topic("sends");
    let reader = TopicReader::new(&app.settings.kafka).unwrap();
    let before: i64 = reader
        .end_offsets(&topic)
        .await
        .unwrap()
        .iter()
        .map(|p| p.1)
        .sum();
    assert_eq!(before, 0);
    for round in 0..3 {
        let payloads: Vec<(String, String)> = (0..700)
            .map(|i| (format!("k{i}"), format!("round {round} record {i}")))
            .collect();
        produce_batch(&app, &topic, &payloads).await;
    }
    let ends = reader.end_offsets(&topic).await.unwrap();
    assert_eq!(ends.iter().map(|p| p.1).sum::<i64>(), 2100, "{ends:?}");
    let from: Vec<(i32, i64)> = ends.iter().map(|(p, _)| (*p, 0)).collect();
    let all = reader.read_to_end(&topic, &from).await.unwrap();
    assert_eq!(all.len(), 2100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_can_start_inside_a_batch() {
    let app = TestApp::spawn().await;
    let topic = app.topic("dlq.users");
    let reader = TopicReader::new(&app.settings.kafka).unwrap();
    // One batch: reading its last record starts inside it.
    let payloads: Vec<(String, String)> = (0..5)
        .map(|i| ("same key".to_string(), format!("record {i}")))
        .collect();
    produce_batch(&app, &topic, &payloads).await;
    let ends = reader.end_offsets(&topic).await.unwrap();
    assert_eq!(ends.iter().map(|p| p.1).sum::<i64>(), 5, "{ends:?}");
    let starts = reader.start_offsets(&topic).await.unwrap();
    let all = reader.read_messages(&topic, &starts).await.unwrap();
    assert_eq!(all.len(), 5, "{starts:?}");
    let last: Vec<(i32, i64)> = ends
        .iter()
        .filter(|e| e.1 > 0)
        .map(|(p, e)| (*p, e - 1))
        .collect();
    let newest = reader.read_messages(&topic, &last).await.unwrap();
    assert_eq!(newest.len(), last.len(), "{last:?}");
}

/// Several producers write the same partitions while a consumer reads them
/// live: every record the broker acknowledged is consumed (a fetch racing a
/// produce must never skip a batch that is not written yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_consumer_sees_every_acknowledged_record_of_concurrent_producers() {
    live_consumer_sees_every_acknowledged_record(&TestApp::spawn().await).await;
}

/// The same on the durable SQLite storage `ese up` runs by default, where
/// fetches run beside produces (vendor/tansu-storage, fifteenth patch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_consumer_sees_every_acknowledged_record_on_durable_storage() {
    let port = crate::harness::free_port();
    let db = crate::harness::BrokerDb::new();
    let _broker = crate::harness::spawn_broker(port, &db.storage());
    let app = TestApp::spawn_with(
        toml::from_str(&format!("[kafka]\nbrokers = \"127.0.0.1:{port}\"")).unwrap(),
    )
    .await;
    live_consumer_sees_every_acknowledged_record(&app).await;
}

async fn live_consumer_sees_every_acknowledged_record(app: &TestApp) {
    use futures::StreamExt;
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};

    let topic = app.topic("webhooks.status.raw");
    let (producers, each) = (4, 5_000);
    // A consumer of `topic` in a new group, from the start.
    let subscribed = |group: &str| {
        let c: StreamConsumer =
            ese::kafka::consumer_config(&app.settings.kafka, &format!("{}.{group}", app.prefix))
                .unwrap()
                .create()
                .unwrap();
        c.subscribe(&[&topic]).unwrap();
        c
    };
    let consumer = subscribed("live");
    let reading = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        let mut stream = consumer.stream();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while seen.len() < producers * each {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(m))) => {
                    seen.insert(
                        String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    );
                }
                Ok(Some(Err(e))) => panic!("consume: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        seen
    });
    let writers = (0..producers).map(|p| {
        let producer = ese::kafka::Producer::new(&app.settings.kafka).unwrap();
        let topic = topic.clone();
        async move {
            for chunk in (0..each).collect::<Vec<_>>().chunks(50) {
                let payloads: Vec<String> = chunk.iter().map(|i| format!("p{p}-{i}")).collect();
                let records = payloads
                    .iter()
                    .map(|v| {
                        FutureRecord::to(&topic)
                            .key(v.as_bytes())
                            .payload(v.as_bytes())
                    })
                    .collect();
                producer
                    .send_all(records, Duration::from_secs(30))
                    .await
                    .unwrap();
            }
        }
    });
    futures::future::join_all(writers).await;
    let seen = reading.await.unwrap();
    let missing: Vec<String> = (0..producers)
        .flat_map(|p| (0..each).map(move |i| format!("p{p}-{i}")))
        .filter(|v| !seen.contains(v))
        .take(10)
        .collect();
    // On failure, say whether the missed records are stored (a fetch skipped
    // them) or not (the produce lost them): read the topic again from the start.
    let mut stored = std::collections::HashMap::new();
    if !missing.is_empty() {
        let again = subscribed("again");
        let mut stream = again.stream();
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_secs(10), stream.next()).await
        {
            let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            if missing.contains(&v) {
                stored.insert(v, (m.partition(), m.offset()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged records never consumed, e.g. {missing:?}; \
         stored (partition, offset) when read again: {stored:?}",
        producers * each - seen.len(),
        producers * each
    );
}

/// A fresh idempotent producer cannot deliver until it holds its producer id;
/// the bridge waits for that before it listens, and `/readyz` reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_producer_says_when_it_can_deliver() {
    let app = TestApp::spawn().await;
    let producer = ese::kafka::Producer::new(&app.settings.kafka).unwrap();
    assert!(producer.wait_ready(Duration::from_secs(20)).await);
    assert!(producer.has_id());

    let mut nowhere = app.settings.kafka.clone();
    nowhere.brokers = format!("127.0.0.1:{}", crate::harness::free_port());
    let stranded = ese::kafka::Producer::new(&nowhere).unwrap();
    assert!(!stranded.wait_ready(Duration::from_secs(2)).await);
    assert!(!stranded.has_id());
}

/// `name`'s config `key` as the broker describes it.
async fn topic_config(app: &TestApp, name: &str, key: &str) -> Option<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        ese::kafka::client_config(&app.settings.kafka)
            .unwrap()
            .create()
            .unwrap();
    let found = admin
        .describe_configs([&ResourceSpecifier::Topic(name)], &AdminOptions::new())
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    found.get(key).and_then(|e| e.value.clone())
}

/// `ese topics create` gives every topic its retention from config, and on
/// existing topics changes only what differs, saying what it changed.
async fn topics_create_sets_and_updates_retention(app: &TestApp) {
    let raw = app.topic("webhooks.status.raw");
    let dlq = app.topic("dlq.receipts");
    let derived = app.topic("receipts.normalized");
    let day_ms = 24 * 3600 * 1000u64;
    for (topic, days) in [(&raw, 30), (&dlq, 90), (&derived, 7)] {
        assert_eq!(
            topic_config(app, topic, "retention.ms").await,
            Some((days * day_ms).to_string()),
            "{topic}"
        );
    }
    // Nothing differs: nothing changed.
    let (ok, out, err) = app.run_ese(&["topics", "create"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("0 created") && out.contains("0 config(s) changed"),
        "{out}"
    );

    // A longer replay window, and a topic made elsewhere without configs.
    let bare = app.topic("made.elsewhere");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ese::kafka::client_config(&app.settings.kafka)
            .unwrap()
            .create()
            .unwrap();
    let new = rdkafka::admin::NewTopic::new(&bare, 1, rdkafka::admin::TopicReplication::Fixed(1));
    for r in admin
        .create_topics([&new], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let env = [
        ("ESE__RETENTION__RAW_TOPIC_RETENTION", "45days".to_string()),
        ("ESE__TOPICS__DLQ_USERS", bare.clone()),
    ];
    let (ok, out, err) = app.run_ese_with(&["topics", "create"], &env).await;
    assert!(ok, "{err}");
    let changed: Vec<&str> = out.lines().filter(|l| l.starts_with("changed ")).collect();
    assert!(
        changed.contains(
            &format!(
                "changed {raw}: retention.ms {} -> {}",
                30 * day_ms,
                45 * day_ms
            )
            .as_str()
        ),
        "{out}"
    );
    assert!(
        changed
            .iter()
            .any(|l| l.starts_with(&format!("changed {bare}: retention.ms "))
                && l.ends_with(&(90 * day_ms).to_string())),
        "{out}"
    );
    assert_eq!(
        topic_config(app, &raw, "retention.ms").await,
        Some((45 * day_ms).to_string())
    );
    assert_eq!(
        topic_config(app, &bare, "retention.ms").await,
        Some((90 * day_ms).to_string())
    );
    assert_eq!(
        topic_config(app, &bare, "cleanup.policy").await.as_deref(),
        Some("delete")
    );
    // Applied once: running it again changes nothing.
    let (ok, out, err) = app.run_ese_with(&["topics", "create"], &env).await;
    assert!(ok, "{err}");
    assert!(out.contains("0 config(s) changed"), "{out}");
}

#[tokio::test]
async fn topics_get_their_retention_from_config() {
    let app = TestApp::spawn().await;
    topics_create_sets_and_updates_retention(&app).await;
}
