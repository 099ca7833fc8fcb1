//! Prometheus metrics: the process-wide recorder and the `/metrics` endpoint.
//!
//! Names follow `ese_<area>_<name>_<unit>`, counters end in `_total`.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::Router;
use axum::routing::get;
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
                        Matcher::Full(names::PIPELINE_END_TO_END_SECONDS.into()),
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
/// Every metric name the engine exports, one constant each; the
/// catalogue below describes them all.
pub mod names {
    pub const ADMIN_UNAUTHORIZED_TOTAL: &str = "ese_admin_unauthorized_total";
    pub const BRIDGE_IN_FLIGHT_REQUESTS: &str = "ese_bridge_in_flight_requests";
    pub const BRIDGE_CONNECTIONS_REFUSED_TOTAL: &str = "ese_bridge_connections_refused_total";
    pub const BRIDGE_PRODUCE_DURATION_SECONDS: &str = "ese_bridge_produce_duration_seconds";
    pub const BRIDGE_REQUESTS_TOTAL: &str = "ese_bridge_requests_total";
    pub const BRIDGE_SIGNATURE_FAILURES_TOTAL: &str = "ese_bridge_signature_failures_total";
    pub const DB_POOL_CONNECTIONS: &str = "ese_db_pool_connections";
    pub const FANOUT_COMMANDS_TOTAL: &str = "ese_fanout_commands_total";
    pub const FANOUT_ERRORS_TOTAL: &str = "ese_fanout_errors_total";
    pub const FANOUT_MESSAGES_TOTAL: &str = "ese_fanout_messages_total";
    pub const FANOUT_PRODUCE_SECONDS: &str = "ese_fanout_produce_seconds";
    pub const FANOUT_SENDS_TOTAL: &str = "ese_fanout_sends_total";
    pub const FANOUT_SKIPPED_TOTAL: &str = "ese_fanout_skipped_total";
    pub const KAFKA_CONSUME_ERRORS_TOTAL: &str = "ese_kafka_consume_errors_total";
    pub const KAFKA_CONSUMER_LAG_RECORDS: &str = "ese_kafka_consumer_lag_records";
    pub const KAFKA_PRODUCER_RECREATED_TOTAL: &str = "ese_kafka_producer_recreated_total";
    pub const PIPELINE_END_TO_END_SECONDS: &str = "ese_pipeline_end_to_end_seconds";
    pub const RECEIPTS_CALLBACKS_TOTAL: &str = "ese_receipts_callbacks_total";
    pub const RECEIPTS_PARKED: &str = "ese_receipts_parked";
    pub const RECEIPTS_SENT_TO_DELIVERED_SECONDS: &str = "ese_receipts_sent_to_delivered_seconds";
    pub const RECEIPTS_TRANSITIONS_TOTAL: &str = "ese_receipts_transitions_total";
    pub const RECEIPTS_UNMATCHED: &str = "ese_receipts_unmatched";
    pub const BUSINESS_REFRESH_ERRORS_TOTAL: &str = "ese_business_refresh_errors_total";
    pub const RETENTION_DELETED_ROWS_TOTAL: &str = "ese_retention_deleted_rows_total";
    pub const RETENTION_ERRORS_TOTAL: &str = "ese_retention_errors_total";
    pub const SCHEDULER_COMMANDS_TOTAL: &str = "ese_scheduler_commands_total";
    pub const SCHEDULER_ERRORS_TOTAL: &str = "ese_scheduler_errors_total";
    pub const SENDER_HELD_TOTAL: &str = "ese_sender_held_total";
    pub const SENDER_PROVIDER_SECONDS: &str = "ese_sender_provider_seconds";
    pub const SENDER_PUMP_ERRORS_TOTAL: &str = "ese_sender_pump_errors_total";
    pub const SENDER_RATE_LIMIT_WAIT_SECONDS: &str = "ese_sender_rate_limit_wait_seconds";
    pub const SENDER_RECONCILED_TOTAL: &str = "ese_sender_reconciled_total";
    pub const SENDER_RELEASED_TOTAL: &str = "ese_sender_released_total";
    pub const SENDER_SENDS_TOTAL: &str = "ese_sender_sends_total";
    pub const SIM_CALLBACKS_TOTAL: &str = "ese_sim_callbacks_total";
    pub const SIM_REQUESTS_TOTAL: &str = "ese_sim_requests_total";
    pub const STAGE_BATCH_DURATION_SECONDS: &str = "ese_stage_batch_duration_seconds";
    pub const STAGE_PHASE_SECONDS: &str = "ese_stage_phase_seconds";
    pub const STAGE_BATCH_SIZE_RECORDS: &str = "ese_stage_batch_size_records";
    pub const STAGE_RECORDS_CONSUMED_TOTAL: &str = "ese_stage_records_consumed_total";
    pub const STAGE_RECORDS_DEAD_LETTERED_TOTAL: &str = "ese_stage_records_dead_lettered_total";
    pub const STAGE_RECORDS_FAILED_TOTAL: &str = "ese_stage_records_failed_total";
    pub const STAGE_RECORDS_OUT_TOTAL: &str = "ese_stage_records_out_total";
    pub const STAGE_RECORDS_PROCESSED_TOTAL: &str = "ese_stage_records_processed_total";
    pub const STAGE_RETRIES_TOTAL: &str = "ese_stage_retries_total";
    pub const BUSINESS_ACTIVE_CAMPAIGNS: &str = "ese_business_active_campaigns";
    pub const BUSINESS_OPTED_IN_USERS: &str = "ese_business_opted_in_users";
    pub const BUSINESS_DELIVERED_TODAY: &str = "ese_business_delivered_today";
    pub const BUSINESS_INBOUND_LAST_HOUR: &str = "ese_business_inbound_last_hour";
    pub const BUSINESS_RUNNING_RATE_LIMIT_PER_SECOND: &str =
        "ese_business_running_rate_limit_per_second";
    pub const DLQ_RECORDS: &str = "ese_dlq_records";
    pub const DLQ_UNREPLAYED_RECORDS: &str = "ese_dlq_unreplayed_records";
    pub const SENDER_SENDING_OLDEST_SECONDS: &str = "ese_sender_sending_oldest_seconds";
}

const CATALOGUE: &[(&str, Kind, &str)] = &[
    (
        names::ADMIN_UNAUTHORIZED_TOTAL,
        Kind::Counter,
        "Admin API calls refused for a missing or wrong token.",
    ),
    (
        names::BRIDGE_IN_FLIGHT_REQUESTS,
        Kind::Gauge,
        "Webhook requests being handled.",
    ),
    (
        names::BRIDGE_CONNECTIONS_REFUSED_TOTAL,
        Kind::Counter,
        "Connections closed on arrival because bridge.max-connections were open.",
    ),
    (
        names::BRIDGE_PRODUCE_DURATION_SECONDS,
        Kind::Histogram,
        "Webhook record produce latency until the broker acknowledged, by route.",
    ),
    (
        names::BRIDGE_REQUESTS_TOTAL,
        Kind::Counter,
        "Webhook requests by route and status code.",
    ),
    (
        names::BRIDGE_SIGNATURE_FAILURES_TOTAL,
        Kind::Counter,
        "Webhooks refused for their X-Twilio-Signature, by reason.",
    ),
    (
        names::DB_POOL_CONNECTIONS,
        Kind::Gauge,
        "Postgres pool connections by state (in_use, idle, max).",
    ),
    (
        names::FANOUT_COMMANDS_TOTAL,
        Kind::Counter,
        "Campaign commands seen by the fanout stage.",
    ),
    (
        names::FANOUT_ERRORS_TOTAL,
        Kind::Counter,
        "Fan-out passes interrupted by an error (resumed).",
    ),
    (
        names::FANOUT_MESSAGES_TOTAL,
        Kind::Counter,
        "Message rows written by fan-out.",
    ),
    (
        names::FANOUT_PRODUCE_SECONDS,
        Kind::Histogram,
        "Time to produce and acknowledge one fan-out page of sends.",
    ),
    (
        names::FANOUT_SENDS_TOTAL,
        Kind::Counter,
        "Send records produced by fan-out.",
    ),
    (
        names::FANOUT_SKIPPED_TOTAL,
        Kind::Counter,
        "Recipients skipped by fan-out, by reason.",
    ),
    (
        names::KAFKA_CONSUME_ERRORS_TOTAL,
        Kind::Counter,
        "Consumer errors by stage.",
    ),
    (
        names::KAFKA_CONSUMER_LAG_RECORDS,
        Kind::Gauge,
        "Consumer lag by stage, topic and partition.",
    ),
    (
        names::KAFKA_PRODUCER_RECREATED_TOTAL,
        Kind::Counter,
        "Producers replaced after a fatal error.",
    ),
    (
        names::PIPELINE_END_TO_END_SECONDS,
        Kind::Histogram,
        "Webhook received by the bridge to row committed, by stage.",
    ),
    (
        names::RECEIPTS_CALLBACKS_TOTAL,
        Kind::Counter,
        "Status callbacks joined, by provider status.",
    ),
    (
        names::RECEIPTS_PARKED,
        Kind::Gauge,
        "Status callbacks waiting for their message's provider SID.",
    ),
    (
        names::RECEIPTS_SENT_TO_DELIVERED_SECONDS,
        Kind::Histogram,
        "Time from sent to delivered.",
    ),
    (
        names::RECEIPTS_TRANSITIONS_TOTAL,
        Kind::Counter,
        "Message status changes by new status.",
    ),
    (
        names::RECEIPTS_UNMATCHED,
        Kind::Gauge,
        "Parked callbacks older than receipts.unmatched-after.",
    ),
    (
        names::BUSINESS_REFRESH_ERRORS_TOTAL,
        Kind::Counter,
        "Passes of the business and pool gauges that failed (database unreachable).",
    ),
    (
        names::RETENTION_DELETED_ROWS_TOTAL,
        Kind::Counter,
        "Expired audit rows deleted by the scheduler's retention, by table.",
    ),
    (
        names::RETENTION_ERRORS_TOTAL,
        Kind::Counter,
        "Retention passes that failed.",
    ),
    (
        names::SCHEDULER_COMMANDS_TOTAL,
        Kind::Counter,
        "Campaigns started or completed by the scheduler.",
    ),
    (
        names::SCHEDULER_ERRORS_TOTAL,
        Kind::Counter,
        "Scheduler ticks that failed.",
    ),
    (
        names::SENDER_HELD_TOTAL,
        Kind::Counter,
        "Sends held back (paused, quiet hours, not due), by reason.",
    ),
    (
        names::SENDER_PROVIDER_SECONDS,
        Kind::Histogram,
        "Provider API call latency.",
    ),
    (
        names::SENDER_PUMP_ERRORS_TOTAL,
        Kind::Counter,
        "Sender pump passes that failed.",
    ),
    (
        names::SENDER_RATE_LIMIT_WAIT_SECONDS,
        Kind::Histogram,
        "Time sends waited for the rate limiters.",
    ),
    (
        names::SENDER_RECONCILED_TOTAL,
        Kind::Counter,
        "Claimed-but-unanswered sends reconciled, by outcome.",
    ),
    (
        names::SENDER_RELEASED_TOTAL,
        Kind::Counter,
        "Held sends released when due.",
    ),
    (
        names::SENDER_SENDS_TOTAL,
        Kind::Counter,
        "Send attempts by outcome (sent, transient, permanent, unknown, skipped).",
    ),
    (
        names::SIM_CALLBACKS_TOTAL,
        Kind::Counter,
        "Provider simulator: status callbacks posted, by outcome.",
    ),
    (
        names::SIM_REQUESTS_TOTAL,
        Kind::Counter,
        "Provider simulator: API requests by outcome.",
    ),
    (
        names::STAGE_BATCH_DURATION_SECONDS,
        Kind::Histogram,
        "Batch processing time by stage.",
    ),
    (
        names::STAGE_PHASE_SECONDS,
        Kind::Histogram,
        "Time per batch by stage and phase (gather: waiting for records; decode, begin, process, commit; acks: waiting for the previous batch's acknowledgements; produce).",
    ),
    (
        names::STAGE_BATCH_SIZE_RECORDS,
        Kind::Histogram,
        "Records per batch by stage.",
    ),
    (
        names::STAGE_RECORDS_CONSUMED_TOTAL,
        Kind::Counter,
        "Records consumed by stage.",
    ),
    (
        names::STAGE_RECORDS_DEAD_LETTERED_TOTAL,
        Kind::Counter,
        "Records sent to the stage's dead-letter topic.",
    ),
    (
        names::STAGE_RECORDS_FAILED_TOTAL,
        Kind::Counter,
        "Record failures by stage and kind (poison, transient).",
    ),
    (
        names::STAGE_RECORDS_OUT_TOTAL,
        Kind::Counter,
        "Records produced by stage.",
    ),
    (
        names::STAGE_RECORDS_PROCESSED_TOTAL,
        Kind::Counter,
        "Records processed and committed by stage.",
    ),
    (
        names::STAGE_RETRIES_TOTAL,
        Kind::Counter,
        "Batch retries after transient errors, by stage.",
    ),
    (
        names::BUSINESS_ACTIVE_CAMPAIGNS,
        Kind::Gauge,
        "Campaigns RUNNING now.",
    ),
    (
        names::BUSINESS_OPTED_IN_USERS,
        Kind::Gauge,
        "Users whose consent is OPT_IN.",
    ),
    (
        names::BUSINESS_DELIVERED_TODAY,
        Kind::Gauge,
        "Messages delivered since midnight UTC.",
    ),
    (
        names::BUSINESS_INBOUND_LAST_HOUR,
        Kind::Gauge,
        "Inbound messages received in the last hour.",
    ),
    (
        names::BUSINESS_RUNNING_RATE_LIMIT_PER_SECOND,
        Kind::Gauge,
        "Sum of the rate limits of RUNNING campaigns.",
    ),
    (
        names::DLQ_UNREPLAYED_RECORDS,
        Kind::Gauge,
        "Dead letters `ese dlq replay` has not put back yet (by stage).",
    ),
    (
        names::SENDER_SENDING_OLDEST_SECONDS,
        Kind::Gauge,
        "Age of the oldest message claimed for sending and not yet answered (0: none).",
    ),
    (
        names::DLQ_RECORDS,
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
