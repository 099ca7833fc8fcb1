//! `ese bench fanout`: one campaign over N opted-in users, fanned out by an
//! `ese run fanout` child process (so its peak RSS is the fan-out's alone),
//! timed from the start command to every message inserted and every send
//! record acknowledged; the ceiling is a binary COPY of the same message rows.

use std::time::{Duration, Instant};

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::{Scratch, rate};
use ese::codec::Codec;
use ese::config::Settings;

/// `ese bench fanout --users N[,M…]`: one run per audience size.
pub async fn fanout(settings: Settings, sizes: &[i64]) -> anyhow::Result<()> {
    for &n in sizes {
        let scratch = Scratch::new(settings.clone()).await?;
        let result = run(&scratch, n).await;
        scratch.cleanup().await?;
        result?;
    }
    Ok(())
}

async fn run(scratch: &Scratch, n: i64) -> anyhow::Result<()> {
    let settings = &scratch.settings;
    println!(
        "fanout bench: {n} users, page size {}, broker {}, postgres db {}",
        settings.campaigns.fanout_page_size, settings.kafka.brokers, scratch.db_name
    );
    let pool = ese::db::pool(&settings.database)?;
    let client = pool.get().await?;
    let started = Instant::now();
    client
        .execute(
            "INSERT INTO users (phone_e164, attributes)
             SELECT '+1' || (2000000000 + i)::text,
                    jsonb_build_object('first_name', 'User' || i, 'plan', 'pro', 'age', 20 + i % 60)
               FROM generate_series(1, $1::bigint) i",
            &[&n],
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE users").await?;
    println!(
        "  seeded users (setup)   {:>10.1} s",
        started.elapsed().as_secs_f64()
    );
    let campaign: uuid::Uuid = client
        .query_one(
            "WITH t AS (INSERT INTO templates (name, content, variables) VALUES
                          ('bench', 'Hello {first_name}, our spring sale starts today.', '[\"first_name\"]') RETURNING id),
                  s AS (INSERT INTO segments (name, filter_criteria) VALUES
                          ('bench', '{\"attribute\": \"plan\", \"operator\": \"equals\", \"value\": \"pro\"}') RETURNING id)
             INSERT INTO campaigns (name, template_id, segment_id, status, quiet_hours_start, quiet_hours_end)
             SELECT 'bench', t.id, s.id, 'READY', NULL, NULL FROM t, s RETURNING id",
            &[],
        )
        .await?
        .get(0);

    // Ceiling: COPY of the same message rows (into a copy of the table, so
    // the fan-out below starts from an empty one).
    client
        .batch_execute("CREATE TABLE bench_messages (LIKE messages INCLUDING ALL)")
        .await?;
    let rows = client
        .query(
            "SELECT phone_e164, 'Hello ' || (attributes->>'first_name') || ', our spring sale starts today.'
               FROM users ORDER BY seq",
            &[],
        )
        .await?;
    let started = Instant::now();
    let sink = client
        .copy_in(
            "COPY bench_messages (id, campaign_id, recipient_phone, rendered_content) FROM STDIN BINARY",
        )
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::UUID, Type::UUID, Type::TEXT, Type::TEXT]);
    futures::pin_mut!(writer);
    for r in &rows {
        let (phone, body): (String, String) = (r.get(0), r.get(1));
        let id = uuid::Uuid::now_v7();
        writer
            .as_mut()
            .write(&[&id, &campaign, &phone, &body])
            .await?;
    }
    writer.finish().await?;
    let copy = started.elapsed();
    drop(rows);
    client.batch_execute("DROP TABLE bench_messages").await?;
    println!(
        "  ceiling: COPY          {:>10.0} rows/s",
        rate(n as usize, copy)
    );

    // The fan-out in its own process.
    let (mut child, config) =
        super::spawn_ese(settings, &scratch.db_name, &["run", "fanout"], &[])?;
    let deps = ese::runner::Deps {
        settings: settings.clone(),
        pool: pool.clone(),
        producer: ese::kafka::Producer::new(&settings.kafka)?,
        codec: Codec::single_object()?,
    };
    let commands = ese::campaigns::Commands::new(&deps)?;
    let started = Instant::now();
    {
        let mut c = pool.get().await?;
        let tx = c.transaction().await?;
        commands
            .transition(&tx, campaign, ese::model::CampaignAction::Start, "bench")
            .await?;
        tx.commit().await?;
    }
    let mut peak = 0u64;
    let took = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
        let row = client
            .query_one(
                "SELECT finished, sends_produced FROM fanout_progress WHERE campaign_id = $1",
                &[&campaign],
            )
            .await?;
        let (finished, produced): (bool, i64) = (row.get(0), row.get(1));
        if finished && produced >= n {
            break started.elapsed();
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the fanout process exited ({status}) at {produced}/{n}");
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            anyhow::bail!("fan-out did not finish in 10 minutes ({produced}/{n})");
        }
    };
    peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&config);
    let messages: i64 = client
        .query_one(
            "SELECT count(*) FROM messages WHERE campaign_id = $1",
            &[&campaign],
        )
        .await?
        .get(0);
    anyhow::ensure!(messages == n, "{messages} messages for {n} users");
    let r = rate(n as usize, took);
    println!(
        "  fan-out                {:>10.0} recipients/s ({:.1} s for {n}; target ≥ 16,700/s)",
        r,
        took.as_secs_f64()
    );
    println!(
        "  ratio to COPY: {:.0}%; peak RSS of the fanout process {:.0} MB (target ≤ 300 MB)",
        100.0 * r / rate(n as usize, copy),
        peak as f64 / 1024.0
    );
    Ok(())
}

/// `VmHWM` (peak resident set) of process `pid`, in KiB.
pub(super) fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
