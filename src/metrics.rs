//! Prometheus metrics: the process-wide recorder and the `/metrics` endpoint.
//!
//! Names follow `ese_<area>_<name>_<unit>`, counters end in `_total`.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds) shared by every histogram.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// End-to-end latency: finer around the 250 ms target, so a p99 read from
/// the histogram is not an interpolation across 250–500 ms.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
];
const SIZE_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                // A full-name matcher wins over the suffix one.
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("ese_pipeline_end_to_end_seconds".into()),
                        LATENCY_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_records".into()), SIZE_BUCKETS)
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, in which case
            // this handle renders nothing but the process still runs.
            if metrics::set_global_recorder(recorder).is_ok() {
                register_catalogue();
            }
            handle
        })
        .clone()
}

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the engine exports, with its help text. Each is registered
/// (at zero) when the recorder is installed, so `/metrics` names all of them
/// from the start: dashboards and alerts see 0, not "no data".
const CATALOGUE: &[(&str, Kind, &str)] = &[
    (
        "ese_admin_unauthorized_total",
        Kind::Counter,
        "Admin API calls refused for a missing or wrong token.",
    ),
    (
        "ese_bridge_in_flight_requests",
        Kind::Gauge,
        "Webhook requests being handled.",
    ),
    (
        "ese_bridge_produce_duration_seconds",
        Kind::Histogram,
        "Webhook record produce latency until the broker acknowledged, by route.",
    ),
    (
        "ese_bridge_requests_total",
        Kind::Counter,
        "Webhook requests by route and status code.",
    ),
    (
        "ese_bridge_signature_failures_total",
        Kind::Counter,
        "Webhooks refused for their X-Twilio-Signature, by reason.",
    ),
    (
        "ese_db_pool_connections",
        Kind::Gauge,
        "Postgres pool connections by state (in_use, idle, max).",
    ),
    (
        "ese_fanout_commands_total",
        Kind::Counter,
        "Campaign commands seen by the fanout stage.",
    ),
    (
        "ese_fanout_errors_total",
        Kind::Counter,
        "Fan-out passes interrupted by an error (resumed).",
    ),
    (
        "ese_fanout_messages_total",
        Kind::Counter,
        "Message rows written by fan-out.",
    ),
    (
        "ese_fanout_produce_seconds",
        Kind::Histogram,
        "Time to produce and acknowledge one fan-out page of sends.",
    ),
    (
        "ese_fanout_sends_total",
        Kind::Counter,
        "Send records produced by fan-out.",
    ),
    (
        "ese_fanout_skipped_total",
        Kind::Counter,
        "Recipients skipped by fan-out, by reason.",
    ),
    (
        "ese_kafka_consume_errors_total",
        Kind::Counter,
        "Consumer errors by stage.",
    ),
    (
        "ese_kafka_consumer_lag_records",
        Kind::Gauge,
        "Consumer lag by stage, topic and partition.",
    ),
    (
        "ese_kafka_producer_recreated_total",
        Kind::Counter,
        "Producers replaced after a fatal error.",
    ),
    (
        "ese_pipeline_end_to_end_seconds",
        Kind::Histogram,
        "Webhook received by the bridge to row committed, by stage.",
    ),
    (
        "ese_receipts_callbacks_total",
        Kind::Counter,
        "Status callbacks joined, by provider status.",
    ),
    (
        "ese_receipts_parked",
        Kind::Gauge,
        "Status callbacks waiting for their message's provider SID.",
    ),
    (
        "ese_receipts_sent_to_delivered_seconds",
        Kind::Histogram,
        "Time from sent to delivered.",
    ),
    (
        "ese_receipts_transitions_total",
        Kind::Counter,
        "Message status changes by new status.",
    ),
    (
        "ese_receipts_unmatched",
        Kind::Gauge,
        "Parked callbacks older than receipts.unmatched-after.",
    ),
    (
        "ese_scheduler_commands_total",
        Kind::Counter,
        "Campaigns started or completed by the scheduler.",
    ),
    (
        "ese_scheduler_errors_total",
        Kind::Counter,
        "Scheduler ticks that failed.",
    ),
    (
        "ese_sender_held_total",
        Kind::Counter,
        "Sends held back (paused, quiet hours, not due), by reason.",
    ),
    (
        "ese_sender_provider_seconds",
        Kind::Histogram,
        "Provider API call latency.",
    ),
    (
        "ese_sender_pump_errors_total",
        Kind::Counter,
        "Sender pump passes that failed.",
    ),
    (
        "ese_sender_rate_limit_wait_seconds",
        Kind::Histogram,
        "Time sends waited for the rate limiters.",
    ),
    (
        "ese_sender_reconciled_total",
        Kind::Counter,
        "Claimed-but-unanswered sends reconciled, by outcome.",
    ),
    (
        "ese_sender_released_total",
        Kind::Counter,
        "Held sends released when due.",
    ),
    (
        "ese_sender_sends_total",
        Kind::Counter,
        "Send attempts by outcome (sent, transient, permanent, unknown, skipped).",
    ),
    (
        "ese_sim_callbacks_total",
        Kind::Counter,
        "Provider simulator: status callbacks posted, by outcome.",
    ),
    (
        "ese_sim_requests_total",
        Kind::Counter,
        "Provider simulator: API requests by outcome.",
    ),
    (
        "ese_stage_batch_duration_seconds",
        Kind::Histogram,
        "Batch processing time by stage.",
    ),
    (
        "ese_stage_phase_seconds",
        Kind::Histogram,
        "Time per batch by stage and phase (gather: waiting for records; decode, begin, process, commit; acks: waiting for the previous batch's acknowledgements; produce).",
    ),
    (
        "ese_stage_batch_size_records",
        Kind::Histogram,
        "Records per batch by stage.",
    ),
    (
        "ese_stage_records_consumed_total",
        Kind::Counter,
        "Records consumed by stage.",
    ),
    (
        "ese_stage_records_dead_lettered_total",
        Kind::Counter,
        "Records sent to the stage's dead-letter topic.",
    ),
    (
        "ese_stage_records_failed_total",
        Kind::Counter,
        "Record failures by stage and kind (poison, transient).",
    ),
    (
        "ese_stage_records_out_total",
        Kind::Counter,
        "Records produced by stage.",
    ),
    (
        "ese_stage_records_processed_total",
        Kind::Counter,
        "Records processed and committed by stage.",
    ),
    (
        "ese_stage_retries_total",
        Kind::Counter,
        "Batch retries after transient errors, by stage.",
    ),
    (
        "ese_business_active_campaigns",
        Kind::Gauge,
        "Campaigns RUNNING now.",
    ),
    (
        "ese_business_opted_in_users",
        Kind::Gauge,
        "Users whose consent is OPT_IN.",
    ),
    (
        "ese_business_delivered_today",
        Kind::Gauge,
        "Messages delivered since midnight UTC.",
    ),
    (
        "ese_business_inbound_last_hour",
        Kind::Gauge,
        "Inbound messages received in the last hour.",
    ),
    (
        "ese_business_running_rate_limit_per_second",
        Kind::Gauge,
        "Sum of the rate limits of RUNNING campaigns.",
    ),
    (
        "ese_dlq_records",
        Kind::Gauge,
        "Records on each stage's dead-letter topic.",
    ),
];

fn register_catalogue() {
    for (name, kind, help) in CATALOGUE {
        let name = *name;
        match kind {
            Kind::Counter => {
                metrics::describe_counter!(name, *help);
                metrics::counter!(name).increment(0);
            }
            Kind::Gauge => {
                metrics::describe_gauge!(name, *help);
                metrics::gauge!(name).increment(0.0);
            }
            Kind::Histogram => {
                metrics::describe_histogram!(name, *help);
                let _ = metrics::histogram!(name);
            }
        }
    }
}

/// The business figures of the real-time dashboard, one row.
const BUSINESS: &str = "
SELECT (SELECT count(*) FROM campaigns WHERE status = 'RUNNING'),
       (SELECT count(*) FROM users WHERE consent_state = 'OPT_IN'),
       (SELECT count(*) FROM messages
         WHERE delivered_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
       (SELECT count(*) FROM inbound_events WHERE received_at > now() - interval '1 hour'),
       (SELECT coalesce(sum(rate_limit_per_second), 0)::bigint FROM campaigns WHERE status = 'RUNNING')";

/// Refreshes the business gauges from Postgres and each stage's DLQ depth
/// from Kafka every `every`, until `shutdown`.
pub async fn watch_business(
    settings: crate::config::Settings,
    pool: Pool,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = refresh_business(&settings, &pool).await {
            tracing::debug!(error = %e, "business gauges not refreshed");
        }
    }
}

async fn refresh_business(settings: &crate::config::Settings, pool: &Pool) -> anyhow::Result<()> {
    let row = pool.get().await?.query_one(BUSINESS, &[]).await?;
    let names = [
        "ese_business_active_campaigns",
        "ese_business_opted_in_users",
        "ese_business_delivered_today",
        "ese_business_inbound_last_hour",
        "ese_business_running_rate_limit_per_second",
    ];
    for (i, name) in names.into_iter().enumerate() {
        metrics::gauge!(name).set(row.get::<_, i64>(i) as f64);
    }
    let reader = crate::kafka::TopicReader::new(&settings.kafka)?;
    for (stage, p) in &settings.pipelines {
        let depth = reader.depth(&p.dlq).await?;
        metrics::gauge!("ese_dlq_records", "stage" => stage.clone()).set(depth as f64);
    }
    Ok(())
}

/// The router serving `/metrics` (for a process without the bridge) and `/healthz`.
pub fn router() -> Router {
    let handle = handle();
    Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok")))
}

/// Serves [`router`] on `listen` until `shutdown`.
pub async fn serve(listen: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen {listen}: cannot bind: {e}"))?;
    axum::serve(listener, router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| anyhow::anyhow!("metrics server: {e}"))
}

/// Exports the pool's connection counts every few seconds until `shutdown`.
pub async fn watch_pool(pool: Pool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = pool.status();
        let in_use = status.size.saturating_sub(status.available);
        metrics::gauge!("ese_db_pool_connections", "state" => "in_use").set(in_use as f64);
        metrics::gauge!("ese_db_pool_connections", "state" => "idle").set(status.available as f64);
        metrics::gauge!("ese_db_pool_connections", "state" => "max").set(status.max_size as f64);
    }
}
