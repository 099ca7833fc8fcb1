//! The gauges refreshed in the background: business figures and DLQ
//! depths from PostgreSQL and Kafka, and the connection pool's use.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::metrics::names;

/// The business figures of the real-time dashboard, one row.
const BUSINESS: &str = "
SELECT (SELECT count(*) FROM campaigns WHERE status = 'RUNNING'),
       (SELECT count(*) FROM users WHERE consent_state = 'OPT_IN'),
       (SELECT count(*) FROM messages
         WHERE delivered_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
       (SELECT count(*) FROM inbound_events WHERE received_at > now() - interval '1 hour'),
       (SELECT coalesce(sum(rate_limit_per_second), 0)::bigint FROM campaigns WHERE status = 'RUNNING'),
       (SELECT coalesce(extract(epoch FROM now() - min(claimed_at)), 0)::bigint
          FROM messages WHERE status = 'SENDING')";

/// Refreshes the business gauges from Postgres and each stage's DLQ depth
/// from Kafka every `every`, until `shutdown`.
pub async fn watch_business(
    settings: crate::config::Settings,
    pool: Pool,
    every: Duration,
    shutdown: CancellationToken,
) {
    crate::periodic::Task::every(
        "business gauges",
        names::BUSINESS_REFRESH_ERRORS_TOTAL,
        every,
    )
    .run(shutdown, || refresh_business(&settings, &pool))
    .await
}

async fn refresh_business(settings: &crate::config::Settings, pool: &Pool) -> anyhow::Result<()> {
    let row = pool.get().await?.query_one(BUSINESS, &[]).await?;
    let names = [
        names::BUSINESS_ACTIVE_CAMPAIGNS,
        names::BUSINESS_OPTED_IN_USERS,
        names::BUSINESS_DELIVERED_TODAY,
        names::BUSINESS_INBOUND_LAST_HOUR,
        names::BUSINESS_RUNNING_RATE_LIMIT_PER_SECOND,
        names::SENDER_SENDING_OLDEST_SECONDS,
    ];
    for (i, name) in names.into_iter().enumerate() {
        metrics::gauge!(name).set(row.get::<_, i64>(i) as f64);
    }
    let reader = crate::kafka::TopicReader::new(&settings.kafka)?;
    for (stage, p) in &settings.pipelines {
        let depth = reader.depth(&p.dlq).await?;
        metrics::gauge!(names::DLQ_RECORDS, "stage" => stage.clone()).set(depth as f64);
        let left = crate::ops::dlq_unreplayed(&reader, p).await?;
        metrics::gauge!(names::DLQ_UNREPLAYED_RECORDS, "stage" => stage.clone()).set(left as f64);
    }
    Ok(())
}

/// Exports the pool's connection counts every few seconds until `shutdown`.
pub async fn watch_pool(pool: Pool, shutdown: CancellationToken) {
    let every = Duration::from_secs(2);
    crate::periodic::Task::every("pool gauges", names::BUSINESS_REFRESH_ERRORS_TOTAL, every)
        .run(shutdown, || async {
            let status = pool.status();
            let in_use = status.size.saturating_sub(status.available);
            metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "in_use").set(in_use as f64);
            metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "idle")
                .set(status.available as f64);
            metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "max")
                .set(status.max_size as f64);
            Ok(())
        })
        .await
}
