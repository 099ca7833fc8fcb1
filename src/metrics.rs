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
const SIZE_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
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
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
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
