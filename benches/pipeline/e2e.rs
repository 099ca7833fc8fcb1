//! `ese bench e2e`: the engine as one child process (`ese up
//! --with-provider-sim`) on a scratch database and topics. First signed status
//! webhooks at a target rate through bridge → normalize → receipts →
//! Postgres, with lag, CPU and memory sampled every second; then a campaign
//! through fan-out → sender → simulator → signed callbacks → receipts until
//! every message is final. The ceilings beneath (bare produce and consume on
//! the same broker, COPY of the same rows) are measured in the same run,
//! and for each phase how busy the whole machine was and how much of its
//! CPU the host took away (steal).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::webhooks::{PATH, TOKEN, callback, drive};
use super::{Scratch, bench_phone, consume_ceiling, rate};
use ese::config::Settings;
use ese::kafka::TopicReader;

const ADMIN: &str = "bench-admin-token";

/// Where a stalled campaign's unfinished messages are: by status, with how
/// many have receipts stored and how many of those are parked (SID unmatched).
const STALLED: &str = "
SELECT m.status, count(*),
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM delivery_receipts d WHERE d.message_sid = m.provider_sid)),
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM receipts_unmatched u WHERE u.message_sid = m.provider_sid))
  FROM messages m
 WHERE m.campaign_id = $1 AND m.status NOT IN ('DELIVERED', 'READ', 'UNDELIVERED', 'FAILED')
 GROUP BY 1 ORDER BY 1";

/// Up to five unfinished messages with the statuses of their stored callbacks
/// in the order received.
const STALLED_DETAIL: &str = "
SELECT m.provider_sid, m.status,
       (SELECT string_agg(d.status, ',' ORDER BY d.received_at)
          FROM delivery_receipts d WHERE d.message_sid = m.provider_sid)
  FROM messages m
 WHERE m.campaign_id = $1 AND m.status NOT IN ('DELIVERED', 'READ', 'UNDELIVERED', 'FAILED')
 ORDER BY m.id LIMIT 5";

/// `ese bench e2e --rate R --seconds S --campaign-users N`.
pub async fn e2e(
    settings: Settings,
    per_second: u32,
    seconds: u64,
    users: i64,
) -> anyhow::Result<()> {
    // Valid numbers (the callbacks go through phone normalization): +1415 2000001….
    anyhow::ensure!(
        (1..8_000_000).contains(&users),
        "--campaign-users must be between 1 and 7,999,999"
    );
    let scratch = Scratch::new(settings).await?;
    let result = run(&scratch, per_second.max(1), seconds.max(1), users).await;
    scratch.cleanup().await?;
    result
}

fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// CPU seconds (user + system) of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that closes the command name: utime is the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The whole machine's CPU ticks since boot, from `/proc/stat`: (busy,
/// stolen by the host, all). Steal is time the VM wanted a core and the
/// host gave it to someone else: it slows every figure beside it.
fn machine_ticks() -> (f64, f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal …
    let t: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| t.get(i).copied().unwrap_or(0.0);
    let all: f64 = t.iter().sum();
    (all - at(3) - at(4) - at(7), at(7), all)
}

/// The machine's share of CPU busy and stolen since `before`.
fn machine_line(before: (f64, f64, f64)) -> String {
    let now = machine_ticks();
    let all = (now.2 - before.2).max(1.0);
    format!(
        "machine: CPU {:.0}% busy, {:.0}% stolen by the host",
        100.0 * (now.0 - before.0) / all,
        100.0 * (now.1 - before.1) / all
    )
}

/// The rows `campaign` wrote, written again by plain SQL on one connection
/// for a copy of it, with nothing else running: the messages copied in QUEUED, then
/// 50 at a time claimed and sent with a SID (as the sender's chunks), two
/// receipts each copied in (sent, delivered), and those folded into their
/// messages 50 SIDs at a time by the engine's own fold. No HTTP, no Kafka,
/// no consent or campaign checks: the database's share of a campaign.
async fn campaign_writes(
    client: &deadpool_postgres::Client,
    campaign: uuid::Uuid,
) -> anyhow::Result<Duration> {
    const CHUNK: usize = 50;
    let phones: Vec<String> = client
        .query(
            "SELECT recipient_phone FROM messages WHERE campaign_id = $1",
            &[&campaign],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let campaign: uuid::Uuid = client
        .query_one(
            "INSERT INTO campaigns (name, template_id, segment_id, status)
             SELECT 'e2e ceiling', template_id, segment_id, 'RUNNING'
               FROM campaigns WHERE id = $1 RETURNING id",
            &[&campaign],
        )
        .await?
        .get(0);
    let ids: Vec<uuid::Uuid> = phones.iter().map(|_| uuid::Uuid::now_v7()).collect();
    let sids: Vec<String> = (0..phones.len())
        .map(|i| format!("SMceiling{i:023x}"))
        .collect();
    let started = Instant::now();
    let sink = client
        .copy_in(
            "COPY messages (id, campaign_id, recipient_phone, rendered_content) FROM STDIN BINARY",
        )
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::UUID, Type::UUID, Type::TEXT, Type::TEXT]);
    futures::pin_mut!(writer);
    for (id, phone) in ids.iter().zip(&phones) {
        writer
            .as_mut()
            .write(&[id, &campaign, phone, &"Hi"])
            .await?;
    }
    writer.finish().await?;
    let claim = client
        .prepare(
            "UPDATE messages SET status = 'SENDING', claimed_at = now(), updated_at = now()
              WHERE id = ANY($1)",
        )
        .await?;
    let sent = client
        .prepare(
            "UPDATE messages m SET status = 'SENT', provider_sid = x.sid, sent_at = now(), updated_at = now()
               FROM unnest($1::uuid[], $2::text[]) AS x(id, sid) WHERE m.id = x.id",
        )
        .await?;
    for (ids, sids) in ids.chunks(CHUNK).zip(sids.chunks(CHUNK)) {
        client.execute(&claim, &[&ids]).await?;
        client.execute(&sent, &[&ids, &sids]).await?;
    }
    let sink = client
        .copy_in("COPY delivery_receipts (event_id, message_sid, message_status, raw_payload) FROM STDIN BINARY")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::UUID, Type::TEXT, Type::TEXT, Type::JSONB]);
    futures::pin_mut!(writer);
    for sid in &sids {
        for status in ["sent", "delivered"] {
            let payload = serde_json::json!({"MessageSid": sid, "MessageStatus": status});
            writer
                .as_mut()
                .write(&[&uuid::Uuid::new_v4(), sid, &status, &payload])
                .await?;
        }
    }
    writer.finish().await?;
    let fold = client.prepare(ese::db::calls::APPLY_RECEIPTS).await?;
    for sids in sids.chunks(CHUNK) {
        client.query(&fold, &[&sids]).await?;
    }
    Ok(started.elapsed())
}

/// Kills the engine on every exit path.
struct Engine(std::process::Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Quantile `q` from a Prometheus histogram's cumulative buckets (upper bound, count).
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let want = total * q;
    let mut prev = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= want {
            if !le.is_finite() {
                return prev.0;
            }
            let span = (n - prev.1).max(1e-9);
            return prev.0 + (le - prev.0) * (want - prev.1) / span;
        }
        prev = (le, n);
    }
    prev.0
}

/// (sends answered "sent", messages moved to a final status by a callback)
/// on a metrics page: the campaign's progress without asking the database.
fn campaign_counts(page: &str) -> (f64, f64) {
    let sent = super::samples(page, "ese_sender_sends_total")
        .filter(|(labels, _)| super::label(labels, "outcome") == Some("sent"))
        .map(|(_, n)| n)
        .sum();
    let fin = super::samples(page, "ese_receipts_transitions_total")
        .filter(|(labels, _)| {
            matches!(
                super::label(labels, "to"),
                Some("DELIVERED" | "READ" | "UNDELIVERED" | "FAILED")
            )
        })
        .map(|(_, n)| n)
        .sum();
    (sent, fin)
}

/// The `ese_pipeline_end_to_end_seconds` buckets of `stage` on a metrics page.
fn e2e_buckets(page: &str, stage: &str) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = super::samples(page, "ese_pipeline_end_to_end_seconds_bucket")
        .filter(|(labels, _)| super::label(labels, "stage") == Some(stage))
        .filter_map(|(labels, n)| {
            let le = match super::label(labels, "le")? {
                "+Inf" => f64::INFINITY,
                le => le.parse().ok()?,
            };
            Some((le, n))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

async fn run(scratch: &Scratch, per_second: u32, seconds: u64, users: i64) -> anyhow::Result<()> {
    let mut settings = scratch.settings.clone();
    let (bridge, metrics, sim) = (free_addr()?, free_addr()?, free_addr()?);
    let admin = free_addr()?;
    settings.bridge.listen = bridge;
    settings.admin.listen = admin;
    settings.bridge.public_url = format!("http://{bridge}");
    settings.bridge.max_in_flight = 4096;
    settings.metrics.listen = metrics;
    settings.provider_sim.listen = sim;
    settings.provider_sim.rate_limit = 0;
    settings.provider.base_url = format!("http://{sim}");
    settings.sender.global_rate_limit = 0;
    let n = (per_second as u64 * seconds) as usize;
    println!(
        "e2e bench: {n} status webhooks at {per_second}/s, then a {users}-user campaign; broker {}, postgres db {}",
        settings.kafka.brokers, scratch.db_name
    );
    let pool = ese::db::pool(&settings.database)?;
    let client = pool.get().await?;

    // The messages the callbacks belong to; their COPY is the Postgres ceiling.
    client
        .execute(
            "INSERT INTO users (phone_e164)
             SELECT '+1415' || lpad((200 + (i / 10000) % 800)::text, 3, '0') || lpad((i % 10000)::text, 4, '0')
               FROM generate_series(0, $1::bigint - 1) i
             ON CONFLICT (phone_e164) DO NOTHING",
            &[&(n as i64)],
        )
        .await?;
    let campaign: uuid::Uuid = client
        .query_one(
            "WITH t AS (INSERT INTO templates (name, content) VALUES ('e2e', 'Hello') RETURNING id),
                  s AS (INSERT INTO segments (name, filter_criteria) VALUES ('e2e',
                          '{\"attribute\": \"plan\", \"operator\": \"equals\", \"value\": \"webhooks\"}') RETURNING id)
             INSERT INTO campaigns (name, template_id, segment_id, status)
             SELECT 'e2e webhooks', t.id, s.id, 'RUNNING' FROM t, s RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let started = Instant::now();
    let sink = client
        .copy_in("COPY messages (campaign_id, recipient_phone, rendered_content, provider_sid, status, sent_at) FROM STDIN BINARY")
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TIMESTAMPTZ,
        ],
    );
    futures::pin_mut!(writer);
    let sent_at = chrono::Utc::now() - chrono::Duration::minutes(1);
    for i in 0..n {
        let (phone, sid) = (bench_phone(i), format!("SM{i:032x}"));
        writer
            .as_mut()
            .write(&[&campaign, &phone, &"Hello", &sid, &"SENT", &sent_at])
            .await?;
    }
    writer.finish().await?;
    let copy = rate(n, started.elapsed());
    // As after any bulk load: the planner sees the rows just written.
    client.batch_execute("ANALYZE messages").await?;

    // Ceilings on the broker: bare produce and consume of same-size records.
    let bodies: Arc<Vec<(String, String)>> = Arc::new(
        (0..n)
            .map(|i| callback(&settings.bridge.public_url, i))
            .collect(),
    );
    let ceiling_topic = format!("{}.ceiling", settings.topic("webhooks-status")?);
    let ceiling = [(ceiling_topic.clone(), settings.retention.topic_retention)];
    ese::kafka::ensure_topics(&settings.kafka, &ceiling.into_iter().collect()).await?;
    let producer = ese::kafka::Producer::new(&settings.kafka)?;
    let produce = super::produce_ceiling(&producer, &ceiling_topic, n, |i| {
        (None, bodies[i].0.as_bytes())
    })
    .await?;
    let consume = rate(n, consume_ceiling(&settings, &ceiling_topic, n).await?);
    println!("  ceiling: bare produce {produce:>10.0} rec/s");
    println!("  ceiling: bare consume {consume:>10.0} rec/s");
    println!("  ceiling: COPY         {copy:>10.0} rows/s");

    // The engine.
    let (child, config) = super::spawn_ese(
        &settings,
        &format!("{}-e2e", scratch.db_name),
        &["up", "--with-provider-sim"],
        &[
            ("TWILIO_ACCOUNT_SID", "ACbench"),
            ("TWILIO_AUTH_TOKEN", TOKEN),
            ("ESE_ADMIN_TOKEN", ADMIN),
        ],
    )?;
    let engine = Engine(child);
    let pid = engine.0.id();
    let http = ese::http::client_builder().build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("http://{bridge}/healthz"))
        .send()
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "the engine did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Lag, CPU and RSS every second while the webhooks flow.
    let reader = TopicReader::new(&settings.kafka)?;
    let groups: Vec<(String, Vec<String>)> = ["normalize", "receipts"]
        .iter()
        .map(|s| {
            let p = settings.pipeline(s)?;
            Ok((p.group_id.clone(), p.inputs.clone()))
        })
        .collect::<anyhow::Result<_>>()?;
    let lag = {
        let (reader, groups) = (reader.clone(), groups.clone());
        move || {
            let (reader, groups) = (reader.clone(), groups.clone());
            async move {
                let mut behind = 0;
                for (g, topics) in &groups {
                    for t in topics {
                        behind += reader
                            .group_offsets(g, t)
                            .await?
                            .iter()
                            .map(|p| p.lag())
                            .sum::<i64>();
                    }
                }
                anyhow::Ok(behind)
            }
        }
    };
    let cpu0 = cpu_seconds(pid);
    let machine0 = machine_ticks();
    let t0 = Instant::now();
    let load = tokio::spawn({
        let bodies = bodies.clone();
        let url = format!("http://{bridge}{PATH}");
        async move { drive(&url, bodies, 512, Some(per_second as f64)).await }
    });
    let mut samples = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let behind = lag().await.unwrap_or(-1);
        let rss = super::fanout::peak_rss_kib(pid).unwrap_or(0);
        samples.push((t0.elapsed().as_secs(), behind, rss));
        if load.is_finished() && behind == 0 {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(seconds + 180),
            "the pipeline did not catch up ({behind} behind)"
        );
    }
    let caught_up = t0.elapsed();
    let cpu = cpu_seconds(pid) - cpu0;
    let machine = machine_line(machine0);
    let load = load.await??;
    load.print("webhooks accepted (HTTP)");
    println!(
        "  HTTP max per second (ms): {}",
        load.worst_by_second
            .iter()
            .map(|w| format!("{:.0}", w.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let metrics_page = || async {
        anyhow::Ok(
            http.get(format!("http://{metrics}/metrics"))
                .send()
                .await?
                .text()
                .await?,
        )
    };
    let page = metrics_page().await?;
    for stage in ["normalize", "receipts"] {
        let none = Default::default();
        println!(
            "{}",
            super::phase_line(stage, &none, &super::phase_totals(&page, stage))
        );
    }
    let applied = client
        .query_one(
            "SELECT count(*) FROM messages WHERE campaign_id = $1 AND status <> 'SENT'",
            &[&campaign],
        )
        .await?
        .get::<_, i64>(0);
    let audit = client
        .query_one(
            "SELECT count(*),
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM created_at - received_at)), 0),
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM created_at - received_at)), 0),
                    coalesce(max(extract(epoch FROM created_at - received_at))::float8, 0)
               FROM delivery_receipts",
            &[],
        )
        .await?;
    let stored: i64 = audit.get(0);
    if stored < load.ok as i64 {
        println!(
            "  LOST: {} webhooks answered 2xx have no audit row after the consumers caught up",
            load.ok as i64 - stored
        );
    }
    let secs = caught_up.as_secs_f64();
    println!(
        "  normalize              {:>10.0} rec/s over the run ({stored} receipts; {:.0}% of COPY, {:.0}% of bare consume)",
        stored as f64 / secs,
        100.0 * stored as f64 / secs / copy,
        100.0 * stored as f64 / secs / consume
    );
    println!(
        "  receipts               {:>10.0} rec/s over the run ({applied} messages moved on)",
        n as f64 / secs
    );
    println!(
        "  latency accepted → audit row (normalize)  p50 {:>6.0} ms  p99 {:>6.0} ms  max {:>6.0} ms",
        audit.get::<_, f64>(1) * 1e3,
        audit.get::<_, f64>(2) * 1e3,
        audit.get::<_, f64>(3) * 1e3
    );
    let b = e2e_buckets(&page, "receipts");
    let total = b.last().map_or(0.0, |x| x.1);
    let worst = b
        .iter()
        .find(|x| x.0.is_finite() && x.1 >= total)
        .map_or(f64::INFINITY, |x| x.0);
    println!(
        "  latency accepted → message row (receipts) p50 {:>6.0} ms  p99 {:>6.0} ms  max ≤ {:>5.0} ms (histogram)",
        quantile(&b, 0.5) * 1e3,
        quantile(&b, 0.99) * 1e3,
        worst * 1e3
    );
    let third = (samples.len() / 3).max(1);
    let first: f64 = samples.iter().take(third).map(|s| s.1 as f64).sum::<f64>() / third as f64;
    let last: f64 = samples
        .iter()
        .rev()
        .skip(1)
        .take(third)
        .map(|s| s.1 as f64)
        .sum::<f64>()
        / third as f64;
    let lags: Vec<String> = samples.iter().map(|s| s.1.to_string()).collect();
    println!(
        "  lag per second (normalize + receipts): {}",
        lags.join(" ")
    );
    println!(
        "  lag {} (first third avg {first:.0}, last third avg {last:.0}); caught up {secs:.1} s after the first request",
        if last > first * 2.0 + 100.0 {
            "GREW"
        } else {
            "did not grow"
        }
    );
    println!(
        "  engine CPU {:.0}% of one core over the run, peak RSS {} MiB",
        100.0 * cpu / secs,
        samples.last().map_or(0, |s| s.2) / 1024
    );
    println!("  {machine}");

    // A campaign at rate limit off: start → every message final.
    client
        .execute(
            "INSERT INTO users (phone_e164, attributes)
             SELECT '+1415' || (2000000 + i)::text, jsonb_build_object('first_name', 'User' || i, 'plan', 'e2e')
               FROM generate_series(1, $1::bigint) i
             ON CONFLICT (phone_e164) DO UPDATE SET attributes = EXCLUDED.attributes",
            &[&users],
        )
        .await?;
    client.batch_execute("ANALYZE users").await?;
    let id: uuid::Uuid = client
        .query_one(
            "WITH t AS (INSERT INTO templates (name, content) VALUES ('e2e campaign', 'Hi {first_name}') RETURNING id),
                  s AS (INSERT INTO segments (name, filter_criteria) VALUES ('e2e campaign',
                          '{\"attribute\": \"plan\", \"operator\": \"equals\", \"value\": \"e2e\"}') RETURNING id)
             INSERT INTO campaigns (name, template_id, segment_id, status, rate_limit_per_second,
                                    quiet_hours_start, quiet_hours_end)
             SELECT 'e2e campaign', t.id, s.id, 'READY', 1000000, NULL, NULL FROM t, s RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let base = campaign_counts(&metrics_page().await?);
    let cpu0 = cpu_seconds(pid);
    let machine0 = machine_ticks();
    let t0 = Instant::now();
    let r = http
        .post(format!("http://{admin}/api/v1/campaigns/{id}/start"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "start campaign: {}", r.status());
    let mut last_print = Instant::now();
    let mut last_count = Instant::now();
    let mut progress = (0i64, Instant::now());
    loop {
        // Progress from the engine's metrics page, every second (every 200 ms
        // in the last 5%). Only
        // the database's rows say the campaign is done (a message the sender
        // fails has no callback): the unfinished messages, which the campaign
        // index holds apart, are counted every 5 s, every second in the last
        // 5%, and at each look once the metrics say all are final. Counting
        // them every second took a few percent of PostgreSQL's time from the
        // engine it measures (60–75 ms a count).
        let (sent, fin) = campaign_counts(&metrics_page().await?);
        let (sent, fin) = ((sent - base.0) as i64, (fin - base.1) as i64);
        let every = if fin >= users {
            Duration::ZERO
        } else if users - fin < users / 20 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        if last_count.elapsed() >= every {
            last_count = Instant::now();
            let row = client
                .query_one(
                    "SELECT coalesce((SELECT messages_created FROM fanout_progress WHERE campaign_id = $1), 0), count(*)
                       FROM messages WHERE campaign_id = $1 AND status IN ('QUEUED', 'SENDING', 'SENT')",
                    &[&id],
                )
                .await?;
            let (created, pending): (i64, i64) = (row.get(0), row.get(1));
            // Rows written before their page is counted as created: at least 0.
            let done = (created - pending).max(0);
            if done >= users {
                break;
            }
            if done != progress.0 {
                progress = (done, Instant::now());
            } else if progress.1.elapsed() > Duration::from_secs(60) {
                // Stalled: say where the unfinished messages are.
                for r in client.query(STALLED, &[&id]).await? {
                    let (status, n, stored, parked): (String, i64, i64, i64) =
                        (r.get(0), r.get(1), r.get(2), r.get(3));
                    println!(
                        "    unfinished: {n} {status} ({stored} with receipts stored, {parked} listed as parked)"
                    );
                }
                // And, for a few of them, which callbacks reached the audit trail.
                for r in client.query(STALLED_DETAIL, &[&id]).await? {
                    let (sid, status, receipts): (Option<String>, String, Option<String>) =
                        (r.get(0), r.get(1), r.get(2));
                    println!(
                        "    {} {status}: receipts {}",
                        sid.as_deref().unwrap_or("(no sid)"),
                        receipts.as_deref().unwrap_or("none")
                    );
                }
                anyhow::bail!("campaign stalled at {done}/{users} final for 60 s");
            }
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            println!(
                "    {:>5.0} s: {sent} sent, {fin} final",
                t0.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        let near_end = users - fin < users / 20;
        tokio::time::sleep(Duration::from_millis(if near_end { 200 } else { 1000 })).await;
    }
    let took = t0.elapsed();
    println!(
        "  campaign of {users}: start → all final {:>6.1} s ({:.0} recipients/s), engine CPU {:.0}%, peak RSS {} MiB",
        took.as_secs_f64(),
        users as f64 / took.as_secs_f64(),
        100.0 * (cpu_seconds(pid) - cpu0) / took.as_secs_f64(),
        super::fanout::peak_rss_kib(pid).unwrap_or(0) / 1024
    );
    println!("  {}", machine_line(machine0));
    drop(engine);
    let _ = std::fs::remove_file(&config);

    // The campaign's own ceiling, the engine stopped: the same rows written
    // by plain SQL on one connection.
    let machine0 = machine_ticks();
    let alone = campaign_writes(&client, id).await?;
    println!(
        "  ceiling: the campaign's writes alone, one connection {:>6.1} s ({:.0}% of the campaign's time); {}",
        alone.as_secs_f64(),
        100.0 * alone.as_secs_f64() / took.as_secs_f64(),
        machine_line(machine0)
    );
    Ok(())
}
