//! `receipts`: normalized status callbacks joined to their messages by
//! provider SID. The fold lives in SQL (`ese_apply_receipts`,
//! `sql/functions/`): status never moves backwards, duplicates change nothing, and a
//! callback that arrived before the sender wrote its SID is parked (listed in
//! `receipts_unmatched`) until the sender's fold of that SID applies it.

use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use metrics::{counter, gauge, histogram};

use crate::model::MessageStatus;
use crate::records::ReceiptNormalized;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::runner::{Collector, Deps, Item, Stage, StageError};

use crate::db::calls::APPLY_RECEIPTS as APPLY;
use crate::db::calls::MARK_UNREACHABLE;
/// Parked SIDs a message has meanwhile: a fold that parked one can commit
/// after the sender's fold of that SID looked for it.
const MATCHED: &str =
    "DELETE FROM receipts_unmatched u USING messages m WHERE m.provider_sid = u.message_sid";
const PARKED: &str = "SELECT count(*), count(*) FILTER (WHERE first_received_at < now() - make_interval(secs => $1::float8))
                        FROM receipts_unmatched";

/// The receipts stage.
pub struct Receipts {
    /// A parked receipt older than this counts as unmatched.
    pub unmatched_after: Duration,
    /// When the parked gauges were last refreshed.
    pub last_gauge: Mutex<Option<Instant>>,
}

/// The stage, until `shutdown`.
pub fn start(deps: Deps, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let stage = Receipts {
            unmatched_after: deps.settings.receipts.unmatched_after,
            last_gauge: Default::default(),
        };
        deps.consume("receipts", stage, shutdown).await
    })
}

impl Stage for Receipts {
    type Input = ReceiptNormalized;

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
            counter!(crate::metrics::names::RECEIPTS_CALLBACKS_TOTAL, "status" => i.value.status.clone())
                .increment(1);
        }
        for row in &changed {
            let old: MessageStatus = row.get(1);
            let new: MessageStatus = row.get(2);
            counter!(crate::metrics::names::RECEIPTS_TRANSITIONS_TOTAL, "to" => new.as_str())
                .increment(1);
            if new == MessageStatus::Delivered && old != MessageStatus::Delivered {
                let sent: Option<DateTime<Utc>> = row.get(3);
                let delivered: Option<DateTime<Utc>> = row.get(4);
                if let (Some(s), Some(d)) = (sent, delivered) {
                    let secs = (d - s).num_milliseconds().max(0) as f64 / 1000.0;
                    histogram!(crate::metrics::names::RECEIPTS_SENT_TO_DELIVERED_SECONDS)
                        .record(secs);
                }
            }
        }
        // A person the provider says is not on this channel (63003…).
        let failed: Vec<Uuid> = changed
            .iter()
            .filter(|r| {
                matches!(
                    r.get::<_, MessageStatus>(2),
                    MessageStatus::Failed | MessageStatus::Undelivered
                )
            })
            .map(|r| r.get(0))
            .collect();
        if !failed.is_empty() {
            let codes = crate::twilio::errors::not_on_channel();
            tx.execute(
                &tx.prepare_cached(MARK_UNREACHABLE).await?,
                &[&failed, &codes],
            )
            .await?;
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
        gauge!(crate::metrics::names::RECEIPTS_PARKED).set(row.get::<_, i64>(0) as f64);
        gauge!(crate::metrics::names::RECEIPTS_UNMATCHED).set(row.get::<_, i64>(1) as f64);
        Ok(())
    }
}
