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

/// The same on the journal storage `ese up` runs by default.
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

/// The journal storage `ese up` runs by default keeps each topic to its
/// `retention.ms`: batches whose newest record is older go and the log
/// start moves past them; the offset for a time comes from the records' own
/// times, also after the broker is killed and its journal loaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_storage_keeps_retention_and_finds_offsets_by_record_time() {
    let port = crate::harness::free_port();
    let db = crate::harness::BrokerDb::new();
    // Retention runs at the broker's maintenance, every second here.
    let storage = format!("{}?maintenance_interval=1s", db.storage());
    let mut broker = crate::harness::spawn_broker(port, &storage);
    let app = TestApp::spawn_with(
        toml::from_str(&format!(
            "[kafka]\nbrokers = \"127.0.0.1:{port}\"\n[retention]\ntopic-retention = \"1h\""
        ))
        .unwrap(),
    )
    .await;
    let topic = app.topic("sends");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let minutes_ago = |m: i64| now - m * 60_000;
    // One batch each on partition 0, at offsets 0..4: two past the hour's
    // retention, two within it.
    for (i, age) in [180, 120, 10, 0].into_iter().enumerate() {
        let payload = format!("record {i}");
        let record = FutureRecord::to(&topic)
            .partition(0)
            .key("k".as_bytes())
            .payload(payload.as_bytes())
            .timestamp(minutes_ago(age));
        app.producer
            .send_all(vec![record], Duration::from_secs(10))
            .await
            .unwrap();
    }
    let reader = TopicReader::new(&app.settings.kafka).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (start, _, _) = partition_zero(&reader, &topic, &[]).await;
        if start == Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log start {start:?}, expected 2 once retention ran"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let kept = reader.read_messages(&topic, &[(0, 2)]).await.unwrap();
    let kept: Vec<String> = kept
        .iter()
        .map(|m| String::from_utf8_lossy(rdkafka::Message::payload(m).unwrap_or_default()).into())
        .collect();
    assert_eq!(kept, ["record 2", "record 3"]);

    let times = [minutes_ago(30), minutes_ago(5), now + 60_000];
    let expected = (Some(2), Some(4), vec![Some(2), Some(3), None]);
    assert_eq!(partition_zero(&reader, &topic, &times).await, expected);
    // Killed and started again on the same journal: the same answers.
    broker.kill9();
    let _broker = crate::harness::spawn_broker(port, &storage);
    let reader = TopicReader::new(&app.settings.kafka).unwrap();
    assert_eq!(partition_zero(&reader, &topic, &times).await, expected);
}

/// Partition 0 of `topic` as a reader sees it: its log start, its end, and
/// the offset for each of `times` (None where every record is older).
async fn partition_zero(
    reader: &TopicReader,
    topic: &str,
    times: &[i64],
) -> (Option<i64>, Option<i64>, Vec<Option<i64>>) {
    let zero = |offsets: Vec<(i32, i64)>| offsets.iter().find(|p| p.0 == 0).map(|p| p.1);
    let start = zero(reader.start_offsets(topic).await.unwrap());
    let end = zero(reader.end_offsets(topic).await.unwrap());
    let mut at = vec![];
    for time in times {
        let found = reader.offsets_for_time(topic, *time).await.unwrap();
        at.push(found.iter().find(|p| p.0 == 0).and_then(|p| p.1));
    }
    (start, end, at)
}
