//! `ese bench sender`: the sender against the provider simulator. At a
//! configured campaign rate the simulator's own per-second counts give the
//! mean rate and the busiest second; with the limit off, the ceiling in
//! sends/s. Fan-out and sender run in one child `ese run fanout sender`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Scratch, rate};
use ese::config::Settings;

const ACCOUNT: &str = "ACbench00000000000000000000000000";
const TOKEN: &str = "bench-token";

/// `ese bench sender --seconds S`: SMS campaigns at 100/s and 1,000/s for S
/// seconds, a WhatsApp campaign at 1,000/s held to the WhatsApp sender's
/// limit (`sender.whatsapp-rate-limit`, 80/s), then limits off.
pub async fn sender(settings: Settings, seconds: u64, ceiling_sends: u64) -> anyhow::Result<()> {
    let wa = settings.sender.whatsapp_rate_limit as u64;
    for (channel, limit, n) in [
        ("SMS", 100, 100 * seconds),
        ("SMS", 1000, 1000 * seconds),
        ("WHATSAPP", 1000, wa * seconds),
        ("SMS", 0, ceiling_sends),
    ] {
        if n == 0 {
            continue;
        }
        let scratch = Scratch::new(settings.clone()).await?;
        let result = run(&scratch, channel, limit, n as i64).await;
        scratch.cleanup().await?;
        result?;
    }
    Ok(())
}

async fn run(scratch: &Scratch, channel: &str, limit: i32, n: i64) -> anyhow::Result<()> {
    let mut settings = scratch.settings.clone();
    let mut sim_cfg = settings.provider_sim.clone();
    sim_cfg.callback_statuses = Vec::new(); // sends only: no bridge in this bench
    sim_cfg.rate_limit = 0;
    let sim = ese::sim::Simulator::new(sim_cfg, ACCOUNT.into(), TOKEN.into())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ese::sim::serve_on(sim, listener, stop.clone()));
    let _stop = stop.drop_guard();
    settings.provider.base_url = base.clone();

    let pool = ese::db::pool(&settings.database)?;
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO users (phone_e164, attributes)
             SELECT '+1' || (2000000000 + i)::text, jsonb_build_object('plan', 'pro', 'timezone', 'UTC')
               FROM generate_series(1, $1::bigint) i",
            &[&n],
        )
        .await?;
    let per_second = if limit == 0 { 1_000_000 } else { limit };
    let campaign: uuid::Uuid = client
        .query_one(
            "WITH t AS (INSERT INTO templates (name, content, channel, content_sid, content_variables)
                        SELECT 'bench', 'Hello {plan}', $2::text,
                               CASE WHEN $2 = 'WHATSAPP' THEN 'HX00000000000000000000000000000001' END,
                               '[\"plan\", \"plan\"]'::jsonb
                        RETURNING id),
                  s AS (INSERT INTO segments (name, filter_criteria) VALUES
                          ('bench', '{\"attribute\": \"plan\", \"operator\": \"equals\", \"value\": \"pro\"}') RETURNING id)
             INSERT INTO campaigns (name, template_id, segment_id, status, rate_limit_per_second,
                                    quiet_hours_start, quiet_hours_end)
             SELECT 'bench', t.id, s.id, 'READY', $1, NULL, NULL FROM t, s RETURNING id",
            &[&per_second, &channel],
        )
        .await?
        .get(0);

    let (mut child, config) = super::spawn_ese(
        &settings,
        &format!("{}-sender", scratch.db_name),
        &["run", "fanout", "sender"],
        &[
            ("TWILIO_ACCOUNT_SID", ACCOUNT),
            ("TWILIO_AUTH_TOKEN", TOKEN),
        ],
    )?;
    // Let the sender join its group before the first send exists.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deps = ese::runner::Deps::new(&settings)?;
    {
        let mut c = pool.get().await?;
        let tx = c.transaction().await?;
        ese::campaigns::Commands::new(&deps)?
            .transition(&tx, campaign, ese::model::CampaignAction::Start, "bench")
            .await?;
        tx.commit().await?;
    }
    let http = ese::http::client_builder().build()?;
    let started = Instant::now();
    let stats = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stats: serde_json::Value = http
            .get(format!("{base}/sim/stats"))
            .basic_auth(ACCOUNT, Some(TOKEN))
            .send()
            .await?
            .json()
            .await?;
        if stats["accepted"].as_i64().unwrap_or(0) >= n {
            break stats;
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the sender process exited ({status})");
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            anyhow::bail!("not done in 10 minutes: {}", stats["accepted"]);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&config);
    let seconds: BTreeMap<i64, u64> = serde_json::from_value(stats["per_second"].clone())?;
    let (first, last) = match (seconds.keys().next(), seconds.keys().last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => anyhow::bail!("the simulator saw no sends"),
    };
    // Whole seconds only: the first and last are partial.
    let interior: Vec<u64> = seconds
        .iter()
        .filter(|(s, _)| **s != first && **s != last)
        .map(|(_, v)| *v)
        .collect();
    let mean = interior.iter().sum::<u64>() as f64 / interior.len().max(1) as f64;
    let busiest = seconds.values().max().copied().unwrap_or(0);
    let span = (last - first + 1) as u64;
    let counts: Vec<String> = seconds.values().map(u64::to_string).collect();
    println!("  sends per second: {}", counts.join(" "));
    let burst = settings.sender.burst as i32;
    if limit == 0 {
        println!(
            "sender bench, limits off: {n} sends in {span} s → {:.0} sends/s (mean of whole seconds {mean:.0}, busiest second {busiest}; target ≥ 5,000/s)",
            rate(n as usize, Duration::from_secs(span))
        );
    } else {
        // The limit that holds: the campaign's, or the sender's on the
        // channel when lower.
        let channel_limit = match channel {
            "WHATSAPP" => settings.sender.whatsapp_rate_limit as i32,
            _ => settings.sender.sms_rate_limit().unwrap_or(0) as i32,
        };
        let (what, limit) = if channel_limit > 0 && channel_limit < limit {
            (
                format!("{channel} sender limit {channel_limit}/s under a campaign at {limit}/s"),
                channel_limit,
            )
        } else {
            (format!("{channel} campaign at {limit}/s"), limit)
        };
        let over = busiest as i32 > limit + burst;
        println!(
            "sender bench, {what} (burst {burst}): {n} sends over {span} s; mean of whole seconds {mean:.1}/s ({:+.2}% of the limit; target ±1%), busiest second {busiest} (limit + burst {}: {})",
            100.0 * (mean - limit as f64) / limit as f64,
            limit + burst,
            if over { "OVER" } else { "within" }
        );
    }
    Ok(())
}
