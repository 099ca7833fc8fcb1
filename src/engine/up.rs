//! `ese up`: everything in one process.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{cancel_on_signal, run_stages, serve_http};
use crate::config::Settings;
use crate::runner::Deps;
use crate::stages;

/// Migrations, topics, the bridge with the admin API, every stage and the
/// scheduler, and the embedded broker when no brokers are configured; the
/// provider simulator too with `with_provider_sim`. Until SIGINT/SIGTERM.
pub async fn up(mut settings: Settings, with_provider_sim: bool) -> anyhow::Result<()> {
    let storage = settings.broker.storage_url()?;
    let broker = if settings.kafka.brokers.trim().is_empty() {
        let b = crate::broker::start(&settings.broker.listen, &storage).await?;
        settings.kafka.brokers = b.bootstrap.clone();
        Some(b)
    } else {
        None
    };
    let applied = crate::db::migrate(&settings.database.url).await?;
    let topics = settings.topic_retention();
    let report = crate::kafka::ensure_topics(&settings.kafka, &topics).await?;
    for c in &report.changed {
        tracing::info!(topic = %c.topic, config = c.name, was = ?c.was, now = %c.now, "topic config changed");
    }
    // The stop, in order: webhooks (`stop`), then the stages (`stages`),
    // then what they may still call (`last`: simulator, metrics), then the
    // embedded broker.
    let stop = CancellationToken::new();
    cancel_on_signal(stop.clone());
    let stages_stop = CancellationToken::new();
    let last = CancellationToken::new();
    let sim = if with_provider_sim {
        let (addr, task) = crate::sim::start(settings.provider_sim.clone(), last.clone()).await?;
        if settings.provider.base_url == crate::config::TWILIO_API {
            settings.provider.base_url = format!("http://{addr}");
        }
        Some((addr, task))
    } else {
        None
    };
    let deps = Deps::new(&settings)?;
    let metrics = tokio::spawn(crate::metrics::serve(settings.metrics.listen, last.clone()));
    let tokens = crate::twilio::tokens_from_env();
    let signed = !tokens.is_empty();
    let admin = crate::campaigns::api::token_from_env().is_some();
    let bridge_task = serve_http(&settings, &deps, tokens, stop.clone()).await?;
    println!("ese up");
    match &broker {
        Some(b) => println!(
            "  kafka      {} (embedded broker, storage {storage}{})",
            b.bootstrap,
            if storage.starts_with("memory:") {
                ": nothing is kept when ese up stops"
            } else {
                ""
            }
        ),
        None => println!("  kafka      {}", settings.kafka.brokers),
    }
    println!(
        "  postgres   {} ({} migrations applied now)",
        crate::db::redact(&settings.database.url),
        applied.len()
    );
    println!(
        "  webhooks   http://{}/webhooks/twilio/{{status,inbound}} (public URL {}){}",
        settings.bridge.listen,
        settings.bridge.public_url,
        if signed {
            ""
        } else {
            " — TWILIO_AUTH_TOKEN unset: every webhook is refused"
        }
    );
    println!(
        "  admin API  http://{}/api/v1 (OpenAPI at /api/v1/openapi.json){}",
        settings.admin.listen,
        if admin {
            ""
        } else {
            " — ESE_ADMIN_TOKEN unset: every admin call is refused"
        }
    );
    println!("  metrics    http://{}/metrics", settings.metrics.listen);
    match &sim {
        Some((addr, _)) => println!(
            "  provider   {} (simulator on http://{addr}, stats at /sim/stats)",
            settings.provider.base_url
        ),
        None => println!("  provider   {}", settings.provider.base_url),
    }
    println!("  stages     {}", stages::names().join(", "));
    println!("  topics     {}", topics.len());
    let names: Vec<String> = stages::names().iter().map(|s| s.to_string()).collect();
    let running = {
        let (deps, token) = (deps.clone(), stages_stop.clone());
        tokio::spawn(async move { run_stages(&names, &deps, token).await })
    };
    // Until a signal, or a stage stopping on its own (a fatal error).
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = stages_stop.cancelled() => {}
    }
    stop.cancel();
    let bridge = bridge_task.await;
    info!("webhooks no longer taken; stages finishing their batches");
    stages_stop.cancel();
    let timeout = settings.engine.shutdown_timeout;
    let result = match tokio::time::timeout(timeout, running).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(anyhow::anyhow!("the stages' task failed: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "stages still running after engine.shutdown-timeout ({timeout:?}); stopped without them"
        )),
    };
    last.cancel();
    let _ = metrics.await;
    if let Some((_, task)) = sim {
        let _ = task.await;
    }
    // The stages have returned, each after its final synchronous offset
    // commit; with the engine's producer gone too, the embedded broker is
    // stopped last (it answers until then).
    // (Dropping the producer flushes it, blocking: not on an async worker
    // the embedded broker may need.)
    let _ = tokio::task::spawn_blocking(move || drop(deps)).await;
    if let Some(broker) = broker {
        broker.stop(Duration::from_secs(5)).await;
        info!("embedded broker stopped");
    }
    if let Ok(Err(e)) = bridge {
        return result.and(Err(e));
    }
    result
}
