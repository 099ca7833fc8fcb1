//! Wiring one process: shared clients, the stages it runs, signals.

pub mod gauges;
pub mod healthcheck;
pub mod up;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Settings;
use crate::runner::Deps;
use crate::stages;

/// The HTTP surface of `ese serve` and `ese up`, each on its own listener:
/// webhooks and probes on `bridge.listen` (the public one), the admin API on
/// `admin.listen`. Both are bound before this returns (a port in use is an
/// error naming its setting) and served until `stop`, requests in flight
/// finished. Waits until the bridge's producer can deliver (at most
/// `bridge.produce-timeout`), so the first webhooks do not wait for it.
pub async fn serve_http(
    settings: &Settings,
    deps: &Deps,
    tokens: Vec<String>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let bind = |key: &'static str, addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("{key} {addr}: cannot bind: {e}"))
    };
    let webhooks = bind("bridge.listen", settings.bridge.listen).await?;
    let admin_listener = bind("admin.listen", settings.admin.listen).await?;
    let bridge = crate::bridge::Bridge::new(settings, tokens, deps.pool.clone())?;
    if !bridge.producer_ready(settings.bridge.produce_timeout).await {
        tracing::warn!(
            "the bridge's producer has no producer id yet (broker unreachable?); serving anyway, webhooks get 503 until it has"
        );
    }
    let admin = crate::campaigns::api::Admin::new(
        deps.pool.clone(),
        crate::campaigns::Commands::new(deps)?,
        crate::campaigns::api::token_from_env(),
        settings.campaigns.max_filter_depth,
    )?;
    let limits = crate::bridge::Limits::of(&settings.bridge);
    let (webhook_routes, admin_routes) = (bridge.router(), admin.router());
    Ok(tokio::spawn(async move {
        let (a, b) = tokio::join!(
            crate::bridge::serve_on(webhooks, webhook_routes, limits, stop.clone()),
            crate::bridge::serve_on(admin_listener, admin_routes, limits, stop),
        );
        a.and(b)
    }))
}

/// Cancels `token` on SIGINT or SIGTERM; a second one ends the process at
/// once (exit status 130).
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        signal().await;
        info!("signal received, stopping (a second signal exits at once)");
        token.cancel();
        signal().await;
        eprintln!("ese: second signal: exiting at once, without draining");
        std::process::exit(130);
    });
}

/// The next SIGINT or SIGTERM.
async fn signal() {
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
}

/// Runs `names` (stages) until `shutdown`; the first fatal error stops them all
/// and is returned.
pub async fn run_stages(
    names: &[String],
    deps: &Deps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    for n in names {
        if !stages::names().contains(&n.as_str()) {
            anyhow::bail!(
                "unknown stage {n:?}; stages: {}",
                stages::names().join(", ")
            );
        }
    }
    tokio::spawn(gauges::watch_pool(deps.pool.clone(), shutdown.clone()));
    tokio::spawn(gauges::watch_business(
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

/// `ese migrate`.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let applied = crate::db::migrate(&settings.database.url).await?;
    if applied.is_empty() {
        println!("database is up to date");
    }
    for m in applied {
        println!("applied {m}");
    }
    Ok(())
}

/// `ese topics create`.
pub async fn create_topics(settings: &Settings) -> anyhow::Result<()> {
    let topics = settings.topic_retention();
    let report = crate::kafka::ensure_topics(&settings.kafka, &topics).await?;
    for (name, keep) in &topics {
        let state = if report.created.contains(name) {
            "created"
        } else {
            "exists"
        };
        println!(
            "{name:<22} {state:<8} retention {}",
            humantime_serde::re::humantime::format_duration(*keep)
        );
    }
    for c in &report.changed {
        println!(
            "changed {}: {} {} -> {}",
            c.topic,
            c.name,
            c.was.as_deref().unwrap_or("(unset)"),
            c.now
        );
    }
    println!(
        "{} topics: {} created, {} existing, {} config(s) changed",
        topics.len(),
        report.created.len(),
        topics.len() - report.created.len(),
        report.changed.len()
    );
    Ok(())
}

/// `ese run STAGE…`: the stages and `/metrics` until SIGINT/SIGTERM.
pub async fn run(settings: &Settings, stages: &[String]) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let deps = Deps::new(settings)?;
    let metrics = tokio::spawn(crate::metrics::serve(
        settings.metrics.listen,
        shutdown.clone(),
    ));
    let result = run_stages(stages, &deps, shutdown.clone()).await;
    shutdown.cancel();
    let _ = metrics.await;
    result
}

/// `ese serve`: the webhook bridge, the admin API and metrics, each on its
/// own listener, until SIGINT/SIGTERM.
pub async fn serve(settings: &Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let deps = Deps::new(settings)?;
    let tokens = crate::twilio::tokens_from_env();
    if tokens.is_empty() {
        eprintln!(
            "ese: warning: TWILIO_AUTH_TOKEN is not set; every webhook will be refused (403)"
        );
    }
    let metrics = tokio::spawn(crate::metrics::serve(
        settings.metrics.listen,
        shutdown.clone(),
    ));
    let http = serve_http(settings, &deps, tokens, shutdown.clone()).await?;
    println!(
        "ese serve: webhooks on http://{}, admin API on http://{}/api/v1, metrics on http://{}/metrics",
        settings.bridge.listen, settings.admin.listen, settings.metrics.listen
    );
    let result = http
        .await
        .map_err(|e| anyhow::anyhow!("the HTTP task failed: {e}"))?;
    shutdown.cancel();
    let _ = metrics.await;
    result
}

/// `ese broker`: the embedded broker alone until SIGINT/SIGTERM.
pub async fn broker(listen: &str, storage: &str) -> anyhow::Result<()> {
    let broker = crate::broker::start(listen, storage).await?;
    println!(
        "ese broker: Kafka API on {} (storage {storage})",
        broker.bootstrap
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    shutdown.cancelled().await;
    // Clients still connected get up to 5 s to go (`EmbeddedBroker::stop`).
    broker.stop(std::time::Duration::from_secs(5)).await;
    Ok(())
}

/// `ese provider-sim`: the simulator alone until SIGINT/SIGTERM.
pub async fn provider_sim(
    settings: &crate::config::Settings,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let mut cfg = settings.provider_sim.clone();
    if let Some(l) = listen {
        cfg.listen = l;
    }
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let (addr, task) = crate::sim::start(cfg, shutdown).await?;
    println!(
        "ese provider-sim: http://{addr}/{}/Accounts/{{AccountSid}}/Messages.json, stats at /sim/stats",
        crate::twilio::API_VERSION
    );
    task.await?
}
