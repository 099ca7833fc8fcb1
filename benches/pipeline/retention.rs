//! Retention of the audit trail on a big table: `delivery_receipts` filled
//! with `rows` receipts received over ten years (inbound_events a tenth of
//! that), then everything older than seven years deleted by the engine's
//! retention while a writer keeps inserting receipts as the receipts stage
//! does. The ceiling is the writer alone, measured in the same run before:
//! retention must not make live writes wait (no long locks, no rewrite).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Scratch;
use ese::config::Settings;

const FILL: &str = "
INSERT INTO delivery_receipts (event_id, message_sid, message_status, error_code, raw_payload, received_at)
SELECT gen_random_uuid(), 'SM' || md5(i::text),
       (ARRAY['sent', 'delivered', 'failed', 'undelivered', 'read'])[1 + i % 5],
       CASE WHEN i % 5 IN (2, 3) THEN 30003 END,
       jsonb_build_object('MessageSid', 'SM' || md5(i::text), 'MessageStatus', 'delivered',
                          'AccountSid', 'AC00000000000000000000000000000000',
                          'To', '+1415' || lpad((i % 10000000)::text, 7, '0'), 'ApiVersion', '2010-04-01'),
       now() - interval '3650 days' * (1 - i::float8 / $2)
  FROM generate_series($1::bigint, $1 + $3 - 1) i";

const FILL_INBOUND: &str = "
INSERT INTO inbound_events (event_id, message_sid, from_phone, body, raw_payload, received_at)
SELECT gen_random_uuid(), 'SM' || md5(i::text), '+1415' || lpad((i % 10000000)::text, 7, '0'), 'hello',
       jsonb_build_object('Body', 'hello'), now() - interval '3650 days' * (1 - i::float8 / $2)
  FROM generate_series($1::bigint, $1 + $3 - 1) i";

/// The live writer: `batch` receipts per INSERT, as fast as it can, until
/// `stop`; the duration of every INSERT.
async fn writer(
    pool: deadpool_postgres::Pool,
    stop: CancellationToken,
) -> anyhow::Result<Vec<Duration>> {
    let client = pool.get().await?;
    let mut took = Vec::new();
    while !stop.is_cancelled() {
        let started = Instant::now();
        client
            .execute(
                "INSERT INTO delivery_receipts (event_id, message_sid, message_status, raw_payload, received_at)
                 SELECT gen_random_uuid(), 'SMlive' || md5(random()::text), 'delivered', '{}', now()
                   FROM generate_series(1, 500)",
                &[],
            )
            .await?;
        took.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(took)
}

/// delivery_receipts' size with its indexes (GB) and its rows.
async fn size(c: &deadpool_postgres::Client) -> anyhow::Result<(f64, i64)> {
    let r = c
        .query_one(
            "SELECT pg_total_relation_size('delivery_receipts')::float8 / 1e9,
                    (SELECT count(*) FROM delivery_receipts)",
            &[],
        )
        .await?;
    Ok((r.try_get(0)?, r.try_get(1)?))
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn latencies(label: &str, mut d: Vec<Duration>) -> Duration {
    d.sort();
    let (p50, p99, max) = (quantile(&d, 0.5), quantile(&d, 0.99), quantile(&d, 1.0));
    println!(
        "  {label:<34} {:>6} inserts of 500, p50 {:>7.1} ms, p99 {:>7.1} ms, max {:>7.1} ms",
        d.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    p99
}

pub async fn retention(settings: Settings, rows: i64) -> anyhow::Result<()> {
    let scratch = Scratch::new(settings).await?;
    let result = run(&scratch.settings, rows).await;
    scratch.cleanup().await?;
    result
}

async fn run(settings: &Settings, rows: i64) -> anyhow::Result<()> {
    let pool = ese::db::pool(&settings.database)?;
    let client = pool.get().await?;
    println!(
        "retention: {rows} delivery_receipts and {} inbound_events over ten years",
        rows / 10
    );
    let started = Instant::now();
    let chunk = 1_000_000i64.min(rows);
    let mut done = 0;
    while done < rows {
        let n = chunk.min(rows - done);
        client
            .execute(FILL, &[&(done + 1), &(rows as f64), &n])
            .await?;
        client
            .execute(
                FILL_INBOUND,
                &[&(done / 10 + 1), &(rows as f64 / 10.0), &(n / 10)],
            )
            .await?;
        done += n;
        eprintln!(
            "  filled {done}/{rows} ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    for table in ["delivery_receipts", "inbound_events"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await?;
    }
    let (gb, count) = size(&client).await?;
    println!(
        "  filled in {:.0} s: delivery_receipts {count} rows, {gb:.2} GB with indexes",
        started.elapsed().as_secs_f64()
    );

    // Ceiling: the live writer alone.
    let stop = CancellationToken::new();
    let w = tokio::spawn(writer(pool.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.cancel();
    let alone = latencies("writer alone (ceiling)", w.await??);

    let cutoff = ese::db::retention::cutoff(chrono::Utc::now(), settings.retention.audit)?;
    let started = Instant::now();
    let expired = ese::db::retention::expired(&pool, cutoff).await?;
    let counted = started.elapsed();
    let to_delete: i64 = expired.iter().map(|e| e.rows).sum();
    println!(
        "  dry run (count expired)            {to_delete} rows in {:.2} s",
        counted.as_secs_f64()
    );

    // Retention with the writer going on.
    let stop = CancellationToken::new();
    let w = tokio::spawn(writer(pool.clone(), stop.clone()));
    let mut batches = Vec::new();
    let mut last = Instant::now();
    let started = Instant::now();
    let removed = ese::db::retention::remove(
        &pool,
        cutoff,
        settings.retention.batch_size,
        &CancellationToken::new(),
        |_, _| {
            batches.push(last.elapsed());
            last = Instant::now();
        },
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("another retention run held the lock"))?;
    let took = started.elapsed();
    stop.cancel();
    let during = latencies("writer during retention", w.await??);
    let deleted: u64 = removed.iter().map(|(_, n)| n).sum();
    batches.sort();
    println!(
        "  retention: {deleted} rows deleted in {:.1} s ({:.0} rows/s), {} batches of {}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        took.as_secs_f64(),
        deleted as f64 / took.as_secs_f64(),
        batches.len(),
        settings.retention.batch_size,
        quantile(&batches, 0.5).as_secs_f64() * 1e3,
        quantile(&batches, 0.99).as_secs_f64() * 1e3,
        quantile(&batches, 1.0).as_secs_f64() * 1e3,
    );
    anyhow::ensure!(
        deleted as i64 == to_delete,
        "deleted {deleted} of the {to_delete} expired rows"
    );
    let (gb, count) = size(&client).await?;
    println!(
        "  after: delivery_receipts {count} rows, {gb:.2} GB (space reused by new rows after VACUUM, never rewritten)"
    );
    println!(
        "  live writer p99 during retention / alone: {:.2} (target ≤ 2)",
        during.as_secs_f64() / alone.as_secs_f64().max(1e-6)
    );
    Ok(())
}
