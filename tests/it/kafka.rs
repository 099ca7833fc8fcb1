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
