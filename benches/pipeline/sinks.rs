//! `ese bench receipts`: the receipts and consent stages from topic to
//! committed rows, each against its ceiling measured in the same run — the
//! same stage SQL applied to the same batches directly, without Kafka.

use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;

use super::{Scratch, rate};
use ese::config::Settings;
use ese::records::{InboundNormalized, ReceiptNormalized, Record};
use ese::runner::Deps;
use ese::runner::{Collector, InRecord, Item, Stage};
use ese::stages::consent::Consent;
use ese::stages::receipts::Receipts;

/// `ese bench receipts --records N`.
pub async fn receipts(settings: Settings, n: usize) -> anyhow::Result<()> {
    let scratch = Scratch::new(settings).await?;
    let result = run(&scratch, n).await;
    scratch.cleanup().await?;
    result
}

fn item<T>(value: T) -> Item<T> {
    Item {
        record: InRecord {
            topic: String::new(),
            partition: 0,
            offset: 0,
            key: None,
            payload: None,
            timestamp_ms: None,
            headers: Vec::new(),
        },
        value,
    }
}

/// Applies `items` with `stage.process` in batches of `batch`, one transaction each.
async fn bare<S: Stage>(
    stage: &S,
    name: &str,
    deps: &Deps,
    items: Vec<S::Input>,
    batch: usize,
) -> anyhow::Result<Duration> {
    let outputs = std::sync::Arc::new(deps.settings.pipeline(name)?.outputs.clone());
    let items: Vec<Item<S::Input>> = items.into_iter().map(item).collect();
    let mut client = deps.pool.get().await?;
    let started = Instant::now();
    for chunk in items.chunks(batch) {
        let tx = client.transaction().await?;
        let mut out = Collector::new(deps.codec.clone(), outputs.clone());
        stage
            .process(&tx, chunk, &mut out)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tx.commit().await?;
    }
    Ok(started.elapsed())
}

async fn produce<R: Record>(
    deps: &Deps,
    topic: &str,
    records: &[(String, R)],
) -> anyhow::Result<()> {
    for chunk in records.chunks(5000) {
        let mut payloads = Vec::with_capacity(chunk.len());
        for (k, r) in chunk {
            payloads.push((k, deps.codec.encode(topic, r).await?));
        }
        let futures = payloads.iter().map(|(k, p)| {
            deps.producer.send(
                FutureRecord::to(topic)
                    .key(k.as_str())
                    .payload(p.as_slice()),
                Duration::from_secs(60),
            )
        });
        for r in futures::future::join_all(futures).await {
            r.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        }
    }
    Ok(())
}

async fn run(scratch: &Scratch, n: usize) -> anyhow::Result<()> {
    let settings = &scratch.settings;
    let deps = Deps::new(settings)?;
    let client = deps.pool.get().await?;
    println!(
        "receipts/consent bench: {n} records each, postgres db {}",
        scratch.db_name
    );

    // Receipts: n sent messages with SIDs, their `delivered` audit rows (as
    // normalize writes them), and the normalized callbacks.
    let now = chrono::Utc::now();
    client
        .execute(
            "INSERT INTO users (phone_e164)
             SELECT '+1415' || lpad((2000000 + g)::text, 7, '0') FROM generate_series(1, $1::int) g",
            &[&(n as i32)],
        )
        .await?;
    client
        .execute(
            "WITH t AS (INSERT INTO templates (name, content) VALUES ('bench', 'hi') RETURNING id),
                  s AS (INSERT INTO segments (name, filter_criteria) VALUES ('bench', '{}') RETURNING id),
                  c AS (INSERT INTO campaigns (name, template_id, segment_id, status)
                        SELECT 'bench', t.id, s.id, 'RUNNING' FROM t, s RETURNING id)
             INSERT INTO messages (campaign_id, recipient_phone, rendered_content, status, provider_sid, sent_at)
             SELECT c.id, '+1415' || lpad((2000000 + g)::text, 7, '0'), 'hi', 'SENT', 'SM' || g, $1
               FROM c, generate_series(1, $2::int) g",
            &[&now, &(n as i32)],
        )
        .await?;
    client
        .execute(
            "INSERT INTO delivery_receipts (event_id, message_sid, message_status, raw_payload, received_at)
             SELECT gen_random_uuid(), 'SM' || g, 'delivered', '{}'::jsonb, $1::timestamptz + interval '1 second'
               FROM generate_series(1, $2::int) g",
            &[&now, &(n as i32)],
        )
        .await?;
    let callbacks: Vec<ReceiptNormalized> = (1..=n)
        .map(|i| ReceiptNormalized {
            event_id: uuid::Uuid::new_v4().to_string(),
            message_sid: format!("SM{i}"),
            status: "delivered".into(),
            error_code: None,
            channel: ese::model::Channel::Sms,
            recipient: None,
            received_at: now.timestamp_millis() + 1000,
        })
        .collect();
    let batch = settings.pipeline("receipts")?.batch_size;
    let stage = Receipts {
        unmatched_after: settings.receipts.unmatched_after,
        last_gauge: Default::default(),
    };
    let ceiling = bare(&stage, "receipts", &deps, callbacks.clone(), batch).await?;
    let delivered: i64 = client
        .query_one(
            "SELECT count(*) FROM messages WHERE status = 'DELIVERED'",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        delivered == n as i64,
        "ceiling run delivered {delivered}/{n}"
    );
    client
        .batch_execute(
            // Back to SENT for the stage's run: a move the message state
            // machine refuses, so the bench lifts its trigger for it.
            "ALTER TABLE messages DISABLE TRIGGER messages_status_transition;
             UPDATE messages SET status = 'SENT', delivered_at = NULL;
             ALTER TABLE messages ENABLE TRIGGER messages_status_transition;",
        )
        .await?;
    let topic = settings.pipeline("receipts")?.inputs[0].clone();
    let keyed: Vec<(String, ReceiptNormalized)> = callbacks
        .into_iter()
        .map(|c| (c.message_sid.clone(), c))
        .collect();
    produce(&deps, &topic, &keyed).await?;
    let took = super::time_stage(
        &deps,
        "receipts",
        "SELECT count(*) FROM messages WHERE status = 'DELIVERED'",
        n as i64,
    )
    .await?;
    println!(
        "  {:<32} {:>9.0} receipts/s",
        "ceiling: stage SQL, no Kafka",
        rate(n, ceiling)
    );
    println!(
        "  {:<32} {:>9.0} receipts/s",
        "receipts stage, topic → rows",
        rate(n, took)
    );
    println!(
        "  ratio:                           {:.0}% (target ≥ 50%)",
        100.0 * ceiling.as_secs_f64() / took.as_secs_f64()
    );

    // Consent: STOP/START from n distinct numbers, twice (the ceiling and
    // the stage each get events of their own, so neither finds the work done).
    let consent = Consent::new(settings.consent.clone());
    let make = |round: i64| -> Vec<InboundNormalized> {
        (0..n)
            .map(|i| InboundNormalized {
                event_id: uuid::Uuid::new_v4().to_string(),
                message_sid: format!("SMin{round}x{i}"),
                from: format!("+1415{:07}", 3_000_000 + i),
                to: "+14155550123".into(),
                channel: ese::model::Channel::Sms,
                body: if i % 2 == 0 {
                    "STOP".into()
                } else {
                    "START".into()
                },
                profile_name: None,
                wa_id: None,
                num_media: 0,
                received_at: now.timestamp_millis() + round * 1000,
            })
            .collect()
    };
    let batch = settings.pipeline("consent")?.batch_size;
    let ceiling = bare(&consent, "consent", &deps, make(1), batch).await?;
    let inbound = make(2);
    let topic = settings.pipeline("consent")?.inputs[0].clone();
    let keyed: Vec<(String, InboundNormalized)> =
        inbound.into_iter().map(|m| (m.from.clone(), m)).collect();
    produce(&deps, &topic, &keyed).await?;
    let took = super::time_stage(
        &deps,
        "consent",
        "SELECT count(*) FROM consent_events",
        2 * n as i64,
    )
    .await?;
    println!(
        "  {:<32} {:>9.0} decisions/s",
        "ceiling: stage SQL, no Kafka",
        rate(n, ceiling)
    );
    println!(
        "  {:<32} {:>9.0} decisions/s",
        "consent stage, topic → rows",
        rate(n, took)
    );
    println!(
        "  ratio:                           {:.0}% (target ≥ 50%)",
        100.0 * ceiling.as_secs_f64() / took.as_secs_f64()
    );
    Ok(())
}
