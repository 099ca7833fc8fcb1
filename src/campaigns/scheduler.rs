//! The scheduler: READY campaigns whose `schedule_time` has come get their
//! start command, and RUNNING campaigns whose fan-out finished and whose
//! messages are all final become COMPLETED. Rows are taken with
//! `FOR UPDATE SKIP LOCKED`, so any number of schedulers act once per campaign.

use std::time::Duration;
use uuid::Uuid;

use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use metrics::counter;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::Commands;
use crate::model::CampaignAction;
use crate::runner::Deps;

const DUE: &str = "
SELECT id FROM campaigns
 WHERE status = 'READY' AND schedule_time <= now()
 ORDER BY schedule_time, id LIMIT 100
 FOR UPDATE SKIP LOCKED";

const DONE: &str = "
SELECT c.id FROM campaigns c JOIN fanout_progress f ON f.campaign_id = c.id
 WHERE c.status = 'RUNNING' AND f.finished
   AND NOT ese_campaign_pending(c.id)
 ORDER BY c.id LIMIT 100
 FOR UPDATE OF c SKIP LOCKED";

/// Runs [`tick`] every `interval` until `shutdown`; errors are logged and retried.
pub async fn run(pool: Pool, commands: Commands, interval: Duration, shutdown: CancellationToken) {
    info!(?interval, "scheduler running");
    crate::periodic::Task::every(
        "scheduler",
        crate::metrics::names::SCHEDULER_ERRORS_TOTAL,
        interval,
    )
    .run(shutdown, || async {
        tick(&pool, &commands).await.map(|_| ())
    })
    .await
}

/// The scheduler as a stage of `ese run`, until `shutdown`: campaigns due
/// and done, segments' audience estimates kept current, and the audit
/// trail's retention.
pub fn start(deps: Deps, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let commands = Commands::new(&deps)?;
        let campaigns = &deps.settings.campaigns;
        let (every, max_depth) = (campaigns.estimate_interval, campaigns.max_filter_depth);
        let pool = deps.pool.clone();
        // A pass counts up to ESTIMATES_PER_PASS segments, every tenth of
        // the interval: many segments stay current too.
        let estimates = crate::periodic::Task::every(
            "segment estimates",
            crate::metrics::names::SCHEDULER_ERRORS_TOTAL,
            (every / 10).max(Duration::from_secs(1)),
        )
        .run(shutdown.clone(), || {
            refresh_estimates(&pool, every, max_depth)
        });
        let retention = &deps.settings.retention;
        let expired = crate::periodic::Task::every(
            "retention",
            crate::metrics::names::RETENTION_ERRORS_TOTAL,
            retention.interval,
        )
        .run(shutdown.clone(), || {
            crate::db::retention::scheduled_pass(&pool, retention, &shutdown)
        });
        tokio::join!(
            run(
                deps.pool.clone(),
                commands,
                campaigns.scheduler_interval,
                shutdown.clone(),
            ),
            estimates,
            expired
        );
        Ok(())
    })
}

const ESTIMATES_PER_PASS: i64 = 20;

/// Counts again the audience of the segments whose estimate is older than
/// `every` (never estimated first).
pub async fn refresh_estimates(
    pool: &Pool,
    every: Duration,
    max_depth: usize,
) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let stale = client
        .query(
            "SELECT id, filter_criteria FROM segments
              WHERE estimated_at IS NULL OR estimated_at < now() - make_interval(secs => $1)
              ORDER BY estimated_at NULLS FIRST, id LIMIT $2",
            &[&every.as_secs_f64(), &ESTIMATES_PER_PASS],
        )
        .await?;
    for row in stale {
        let id: Uuid = row.get(0);
        match crate::campaigns::segment::parse(&row.get(1), max_depth) {
            Ok(node) => {
                crate::campaigns::segment::store_estimate(&client, id, &node).await?;
            }
            Err(e) => {
                tracing::warn!(segment = %id, error = %e, "stored filter cannot be estimated")
            }
        }
    }
    Ok(())
}

/// One pass: start what is due, complete what is done. Returns both counts.
pub async fn tick(pool: &Pool, commands: &Commands) -> anyhow::Result<(usize, usize)> {
    let started = pass(pool, commands, DUE, CampaignAction::Start).await?;
    let completed = pass(pool, commands, DONE, CampaignAction::Complete).await?;
    counter!(crate::metrics::names::SCHEDULER_COMMANDS_TOTAL, "command" => "start")
        .increment(started as u64);
    counter!(crate::metrics::names::SCHEDULER_COMMANDS_TOTAL, "command" => "complete")
        .increment(completed as u64);
    Ok((started, completed))
}

async fn pass(
    pool: &Pool,
    commands: &Commands,
    query: &str,
    action: CampaignAction,
) -> anyhow::Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let ids: Vec<Uuid> = tx
        .query(query, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &ids {
        commands.transition(&tx, *id, action, "scheduler").await?;
        info!(campaign = %id, %action, "scheduler");
    }
    tx.commit().await?;
    Ok(ids.len())
}
