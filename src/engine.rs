//! Wiring one process: shared clients, the stages it runs, signals.

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::codec::Codec;
use crate::config::Settings;
use crate::stages::{self, Deps};

impl Deps {
    /// Builds the clients every stage of a process shares.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            settings: settings.clone(),
            pool: crate::db::pool(&settings.database)?,
            producer: crate::kafka::Producer::new(&settings.kafka)?,
            codec: Codec::new(&settings.schema_registry)?,
        })
    }
}

/// The HTTP surface of `ese serve` and `ese up`: webhooks, probes, metrics
/// and the admin API. Returns once the bridge's producer can deliver (at most
/// `bridge.produce-timeout`), so the first webhooks do not wait for it.
pub async fn http_router(
    settings: &Settings,
    deps: &Deps,
    tokens: Vec<String>,
) -> anyhow::Result<axum::Router> {
    let bridge = crate::bridge::Bridge::new(settings, tokens, deps.pool.clone())?;
    if !bridge.producer_ready(settings.bridge.produce_timeout).await {
        tracing::warn!(
            "the bridge's producer has no producer id yet (broker unreachable?); serving anyway, webhooks get 503 until it has"
        );
    }
    let admin = crate::campaigns::api::Admin::new(
        deps.pool.clone(),
        deps.commands()?,
        crate::campaigns::api::token_from_env(),
        settings.campaigns.max_filter_depth,
    );
    Ok(bridge.router().merge(admin.router()))
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        info!("signal received, draining");
        token.cancel();
    });
}

/// Runs `names` (stages) until `shutdown`; the first fatal error stops them all
/// and is returned.
pub async fn run_stages(
    names: &[String],
    deps: &Deps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    for n in names {
        if !stages::ALL.contains(&n.as_str()) {
            anyhow::bail!("unknown stage {n:?}; stages: {}", stages::ALL.join(", "));
        }
    }
    tokio::spawn(crate::metrics::watch_pool(
        deps.pool.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::metrics::watch_business(
        deps.settings.clone(),
        deps.pool.clone(),
        deps.settings.metrics.business_interval,
        shutdown.clone(),
    ));
    let mut set = JoinSet::new();
    for n in names {
        let (n, deps, token) = (n.clone(), deps.clone(), shutdown.clone());
        set.spawn(async move { stages::run(&n, deps, token).await });
    }
    let mut first_err = None;
    while let Some(done) = set.join_next().await {
        let result = done.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            shutdown.cancel();
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
