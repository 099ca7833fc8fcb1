//! `receipts`: normalized status callbacks joined to their messages by
//! provider SID. The fold lives in SQL (`ese_apply_receipts`, migrations V3
//! and V6): status never moves backwards, duplicates change nothing, and a
//! callback that arrived before the sender wrote its SID is parked (listed in
//! `receipts_unmatched`) until the sender's fold of that SID applies it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use metrics::{counter, gauge, histogram};

use crate::codec::Codec;
use crate::records::ReceiptNormalized;
use crate::runner::{Collector, InRecord, Item, Stage, StageError};

const APPLY: &str = "SELECT message_id, old_status, new_status, sent_at, delivered_at FROM ese_apply_receipts($1::text[])";
/// Parked SIDs a message has meanwhile: a fold that parked one can commit
/// after the sender's fold of that SID looked for it.
const MATCHED: &str =
    "DELETE FROM receipts_unmatched u USING messages m WHERE m.provider_sid = u.message_sid";
const PARKED: &str = "SELECT count(*), count(*) FILTER (WHERE first_received_at < now() - make_interval(secs => $1::float8))
                        FROM receipts_unmatched";

/// The receipts stage.
pub struct Receipts {
    pub codec: Codec,
    /// A parked receipt older than this counts as unmatched.
    pub unmatched_after: Duration,
    /// When the parked gauges were last refreshed.
    pub last_gauge: Mutex<Option<Instant>>,
}

impl Stage for Receipts {
    type Input = ReceiptNormalized;

    fn name(&self) -> &'static str {
        "receipts"
    }

    async fn decode(&self, record: &InRecord) -> Result<ReceiptNormalized, StageError> {
        Ok(self.codec.decode(record.payload()).await?)
    }

    async fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<ReceiptNormalized>],
        _out: &mut Collector,
    ) -> Result<(), StageError> {
        let mut sids: Vec<&str> = batch.iter().map(|i| i.value.message_sid.as_str()).collect();
        sids.sort_unstable();
        sids.dedup();
        let stmt = tx.prepare_cached(APPLY).await?;
        let changed = tx.query(&stmt, &[&sids]).await?;
        for i in batch {
            counter!("ese_receipts_callbacks_total", "status" => i.value.status.clone())
                .increment(1);
        }
        for row in &changed {
            let old: String = row.get(1);
            let new: String = row.get(2);
            counter!("ese_receipts_transitions_total", "to" => new.clone()).increment(1);
            if new == "DELIVERED" && old != "DELIVERED" {
                let sent: Option<DateTime<Utc>> = row.get(3);
                let delivered: Option<DateTime<Utc>> = row.get(4);
                if let (Some(s), Some(d)) = (sent, delivered) {
                    let secs = (d - s).num_milliseconds().max(0) as f64 / 1000.0;
                    histogram!("ese_receipts_sent_to_delivered_seconds").record(secs);
                }
            }
        }
        self.refresh_parked(tx).await?;
        Ok(())
    }
}

impl Receipts {
    /// Refreshes the parked/unmatched gauges at most every 10 s.
    async fn refresh_parked(&self, tx: &Transaction<'_>) -> Result<(), StageError> {
        {
            let mut last = self.last_gauge.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let age = self.unmatched_after.as_secs_f64();
        tx.execute(MATCHED, &[]).await?;
        let row = tx.query_one(PARKED, &[&age]).await?;
        gauge!("ese_receipts_parked").set(row.get::<_, i64>(0) as f64);
        gauge!("ese_receipts_unmatched").set(row.get::<_, i64>(1) as f64);
        Ok(())
    }
}
