//! Retention of the audit trail: `delivery_receipts` and `inbound_events`
//! rows older than `retention.audit` (seven years) are deleted, a bounded
//! batch per short transaction, so the live tables are neither rewritten nor
//! locked for long and the stages keep writing meanwhile. The tables refuse
//! deletion except inside a transaction that `SET LOCAL ese.retention = 'on'`
//! (migration V12). Run by the scheduler every `retention.interval` and by
//! `ese retention [--dry-run]`.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

/// An audit table and how its expired rows are found through an index.
struct AuditTable {
    name: &'static str,
    /// The values of `slice_column`, each one slice walked through the
    /// index `(slice_column, received_at)`; `None`: the table has an index
    /// on `received_at` alone and is one slice.
    slices: Option<&'static str>,
    /// Rows of one slice received before `$1` (`$2` the slice's value).
    count: &'static str,
    /// Deletes at most `$2` rows of one slice (`$3`) received before `$1`.
    delete: &'static str,
}

/// delivery_receipts is walked per status through the data model's
/// `idx_delivery_receipts_status_received`, so retention adds no index to the
/// receipts' write path; inbound_events has its own index on `received_at`.
const TABLES: [AuditTable; 2] = [
    AuditTable {
        name: "delivery_receipts",
        // A loose index scan: the distinct statuses, one index probe each.
        slices: Some(
            "WITH RECURSIVE s(v) AS (
               (SELECT message_status FROM delivery_receipts ORDER BY message_status LIMIT 1)
               UNION ALL
               SELECT (SELECT message_status FROM delivery_receipts
                        WHERE message_status > s.v ORDER BY message_status LIMIT 1)
                 FROM s WHERE s.v IS NOT NULL)
             SELECT v FROM s WHERE v IS NOT NULL",
        ),
        count: "SELECT count(*), min(received_at) FROM delivery_receipts
                 WHERE message_status = $2 AND received_at < $1",
        delete: "DELETE FROM delivery_receipts WHERE ctid = ANY(ARRAY(
                   SELECT ctid FROM delivery_receipts
                    WHERE message_status = $3 AND received_at < $1
                    ORDER BY received_at LIMIT $2))",
    },
    AuditTable {
        name: "inbound_events",
        slices: None,
        count: "SELECT count(*), min(received_at) FROM inbound_events
                 WHERE received_at < $1 AND $2::text IS NULL",
        delete: "DELETE FROM inbound_events WHERE ctid = ANY(ARRAY(
                   SELECT ctid FROM inbound_events
                    WHERE received_at < $1 AND $3::text IS NULL
                    ORDER BY received_at LIMIT $2))",
    },
];

/// What retention finds expired in one table.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    pub table: &'static str,
    pub rows: i64,
    /// The oldest expired row's `received_at`.
    pub oldest: Option<DateTime<Utc>>,
}

/// The moment before which audit rows have expired, `audit` before `now`.
pub fn cutoff(now: DateTime<Utc>, audit: std::time::Duration) -> anyhow::Result<DateTime<Utc>> {
    chrono::Duration::from_std(audit)
        .ok()
        .and_then(|keep| now.checked_sub_signed(keep))
        .ok_or_else(|| anyhow::anyhow!("retention.audit ({audit:?}) reaches before the calendar"))
}

async fn slices(
    client: &deadpool_postgres::Client,
    table: &AuditTable,
) -> anyhow::Result<Vec<Option<String>>> {
    Ok(match table.slices {
        Some(sql) => client
            .query(sql, &[])
            .await?
            .iter()
            .map(|r| r.try_get::<_, String>(0).map(Some))
            .collect::<Result<_, _>>()?,
        None => vec![None],
    })
}

/// Counts, per table, the rows received before `cutoff`.
pub async fn expired(pool: &Pool, cutoff: DateTime<Utc>) -> anyhow::Result<Vec<Expired>> {
    let client = pool.get().await?;
    let mut found = Vec::new();
    for table in &TABLES {
        let mut e = Expired {
            table: table.name,
            rows: 0,
            oldest: None,
        };
        for slice in slices(&client, table).await? {
            let row = client
                .query_one(table.count, &[&cutoff, &slice])
                .await
                .map_err(|err| anyhow::anyhow!("counting expired {}: {err}", table.name))?;
            e.rows += row.try_get::<_, i64>(0)?;
            let oldest: Option<DateTime<Utc>> = row.try_get(1)?;
            e.oldest = e.oldest.into_iter().chain(oldest).min();
        }
        found.push(e);
    }
    Ok(found)
}

/// One retention run at a time (any number of schedulers, `ese retention`):
/// the key of the session advisory lock it holds.
const RUN_LOCK: i64 = 0x6573_655f_7265_7465; // "ese_rete"

/// Deletes every audit row received before `cutoff`, at most `batch` rows
/// per transaction, calling `progress(table, rows)` after each batch. Stops
/// between batches when `stop` is cancelled. Returns the rows deleted per
/// table, or `None` when another retention run is deleting now.
pub async fn remove(
    pool: &Pool,
    cutoff: DateTime<Utc>,
    batch: i64,
    stop: &CancellationToken,
    progress: impl FnMut(&'static str, u64),
) -> anyhow::Result<Option<Vec<(&'static str, u64)>>> {
    let mut client = pool.get().await?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RUN_LOCK])
        .await?
        .try_get(0)?;
    if !locked {
        return Ok(None);
    }
    let result = remove_locked(&mut client, cutoff, batch, stop, progress).await;
    // A connection that broke has lost the lock with its session.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&RUN_LOCK])
        .await;
    result.map(Some)
}

async fn remove_locked(
    client: &mut deadpool_postgres::Client,
    cutoff: DateTime<Utc>,
    batch: i64,
    stop: &CancellationToken,
    mut progress: impl FnMut(&'static str, u64),
) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let mut removed = Vec::new();
    for table in &TABLES {
        let mut total = 0;
        for slice in slices(client, table).await? {
            loop {
                if stop.is_cancelled() {
                    removed.push((table.name, total));
                    return Ok(removed);
                }
                let tx = client.transaction().await?;
                tx.batch_execute("SET LOCAL ese.retention = 'on'").await?;
                let n = tx
                    .execute(table.delete, &[&cutoff, &batch, &slice])
                    .await
                    .map_err(|err| anyhow::anyhow!("deleting expired {}: {err}", table.name))?;
                tx.commit().await?;
                total += n;
                progress(table.name, n);
                if n < batch as u64 {
                    break;
                }
            }
        }
        removed.push((table.name, total));
    }
    Ok(removed)
}

/// One scheduled pass: deletes what has expired by now, counting it in
/// `ese_retention_deleted_rows_total{table}`.
pub async fn scheduled_pass(
    pool: &Pool,
    cfg: &crate::config::RetentionConfig,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let cutoff = cutoff(Utc::now(), cfg.audit)?;
    let removed = remove(pool, cutoff, cfg.batch_size, stop, |table, rows| {
        metrics::counter!(crate::metrics::names::RETENTION_DELETED_ROWS_TOTAL, "table" => table)
            .increment(rows);
    })
    .await?;
    match removed {
        None => tracing::debug!("retention: another run is deleting now"),
        Some(removed) => {
            for (table, rows) in removed.into_iter().filter(|(_, rows)| *rows > 0) {
                tracing::info!(table, rows, %cutoff, "retention: expired audit rows deleted");
            }
        }
    }
    Ok(())
}
