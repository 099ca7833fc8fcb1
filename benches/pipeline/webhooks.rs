//! `ese bench webhooks`: signed status callbacks driven over HTTP into the
//! bridge, against the two ceilings it composes (a bare HTTP endpoint doing
//! nothing, bare produce of same-size records with the same producer
//! settings), then the normalize stage into Postgres against `COPY`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_util::sync::CancellationToken;

use super::{Scratch, rate};
use ese::bridge::Bridge;
use ese::codec::Codec;
use ese::config::Settings;
use ese::records::{Param, WebhookRaw};
use ese::runner::Deps;
use ese::stages::normalize;
use ese::twilio::signature;

pub(super) const PATH: &str = "/webhooks/twilio/status";
pub(super) const TOKEN: &str = "bench-auth-token";
/// Adjacent COPY / normalize pairs timed (odd, for a median).
const ROUNDS: usize = 5;

/// Latencies and outcome of one load run.
pub(super) struct Run {
    pub(super) elapsed: Duration,
    pub(super) latencies: Vec<Duration>,
    /// The slowest answer to requests sent in each second of the run.
    pub(super) worst_by_second: Vec<Duration>,
    pub(super) ok: usize,
    pub(super) failed: usize,
}

impl Run {
    pub(super) fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
    pub(super) fn print(&self, what: &str) {
        println!(
            "  {what:<28} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  ({} ok, {} failed)",
            rate(self.ok, self.elapsed),
            self.pct(0.5).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            self.latencies
                .last()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            self.ok,
            self.failed
        );
    }
}

/// A realistic signed status callback for message `i`. A recipient's number
/// recurs in three consecutive callbacks, as a message's queued, sent and
/// delivered callbacks name the same recipient.
pub(super) fn callback(public_url: &str, i: usize) -> (String, String) {
    let sid = format!("SM{i:032x}");
    let to = recipient(i);
    let status = ["queued", "sent", "delivered"][i % 3];
    let params: Vec<(String, String)> = [
        ("ApiVersion", "2010-04-01"),
        ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
        ("SmsSid", sid.as_str()),
        ("SmsStatus", status),
        ("MessageStatus", status),
        ("MessageSid", sid.as_str()),
        ("From", "+14155550123"),
        ("To", to.as_str()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sig = signature::sign(TOKEN, &format!("{public_url}{PATH}"), &params);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    (body, sig)
}

/// The recipient of message `i` in [`callback`].
pub(super) fn recipient(i: usize) -> String {
    super::bench_phone(i / 3)
}

/// Sends `bodies` to `url` with `concurrency` workers; with `per_second`,
/// request i is due at start + i / per_second (open loop).
pub(super) async fn drive(
    url: &str,
    bodies: Arc<Vec<(String, String)>>,
    concurrency: usize,
    per_second: Option<f64>,
) -> anyhow::Result<Run> {
    let client = ese::http::client_builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, bodies, next, url) = (
            client.clone(),
            bodies.clone(),
            next.clone(),
            url.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut worst: Vec<Duration> = Vec::new();
            let (mut ok, mut failed) = (0usize, 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((body, sig)) = bodies.get(i) else {
                    break;
                };
                if let Some(rps) = per_second {
                    let due = started + Duration::from_secs_f64(i as f64 / rps);
                    tokio::time::sleep_until(due.into()).await;
                }
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("x-twilio-signature", sig)
                    .body(body.clone())
                    .send()
                    .await;
                let took = t.elapsed();
                lat.push(took);
                let second = (t - started).as_secs() as usize;
                if worst.len() <= second {
                    worst.resize(second + 1, Duration::ZERO);
                }
                worst[second] = worst[second].max(took);
                match r {
                    Ok(r) if r.status().is_success() => ok += 1,
                    _ => failed += 1,
                }
            }
            (lat, worst, ok, failed)
        }));
    }
    let mut run = Run {
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        worst_by_second: Vec::new(),
        ok: 0,
        failed: 0,
    };
    for t in tasks {
        let (lat, worst, ok, failed) = t.await?;
        run.latencies.extend(lat);
        if run.worst_by_second.len() < worst.len() {
            run.worst_by_second.resize(worst.len(), Duration::ZERO);
        }
        for (w, x) in run.worst_by_second.iter_mut().zip(worst) {
            *w = (*w).max(x);
        }
        run.ok += ok;
        run.failed += failed;
    }
    run.elapsed = started.elapsed();
    run.latencies.sort_unstable();
    Ok(run)
}

/// `ese bench webhooks --requests N --concurrency C`.
pub async fn webhooks(
    settings: Settings,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let scratch = Scratch::new(settings).await?;
    let result = webhooks_in(&scratch, requests, concurrency.max(1)).await;
    scratch.cleanup().await?;
    result
}

async fn webhooks_in(scratch: &Scratch, n: usize, conc: usize) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut settings = scratch.settings.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    settings.bridge.public_url = format!("http://{addr}");
    settings.bridge.max_in_flight = conc * 4;
    let pool = ese::db::pool(&settings.database)?;
    let bridge = Bridge::new(&settings, vec![TOKEN.to_string()], pool.clone())?;
    tokio::spawn(ese::bridge::serve_on(
        listener,
        bridge.router(),
        ese::bridge::Limits::of(&settings.bridge),
        shutdown.clone(),
    ));

    let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bare_addr = bare_listener.local_addr()?;
    let bare = Router::new().route(PATH, post(|_body: Bytes| async { StatusCode::OK }));
    let s = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(bare_listener, bare)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
    });

    println!(
        "webhooks bench: {n} signed status callbacks, {conc} concurrent, broker {}, postgres db {}",
        settings.kafka.brokers, scratch.db_name
    );
    let public = settings.bridge.public_url.clone();
    let bodies: Arc<Vec<(String, String)>> =
        Arc::new((0..n).map(|i| callback(&public, i)).collect());

    // Ceiling 1: the same requests to an endpoint that does nothing.
    let http = drive(
        &format!("http://{bare_addr}{PATH}"),
        bodies.clone(),
        conc,
        None,
    )
    .await?;
    http.print("ceiling: bare HTTP");

    // Ceiling 2: the broker's produce rate for same-size records with the
    // bridge's producer settings.
    let codec = Codec::single_object()?;
    let topic = settings.topic("webhooks-status")?.to_string();
    let sample = WebhookRaw {
        event_id: uuid::Uuid::new_v4().to_string(),
        kind: "status".into(),
        path: PATH.into(),
        query: String::new(),
        params: url::form_urlencoded::parse(bodies[0].0.as_bytes())
            .map(|(name, value)| Param {
                name: name.into_owned(),
                value: value.into_owned(),
            })
            .collect(),
        body: None,
        content_type: "application/x-www-form-urlencoded".into(),
        received_at: chrono::Utc::now().timestamp_millis(),
    };
    let payload = codec.encode(&topic, &sample).await?;
    let ceiling_topic = format!("{topic}.ceiling");
    let ceiling = [(ceiling_topic.clone(), settings.retention.topic_retention)];
    ese::kafka::ensure_topics(&settings.kafka, &ceiling.into_iter().collect()).await?;
    let producer = ese::kafka::Producer::new(&Bridge::producer_settings(&settings))?;
    let produce = super::produce_ceiling(&producer, &ceiling_topic, n, |i| {
        (Some(format!("SM{i:032x}").into_bytes()), payload.as_slice())
    })
    .await?;
    println!(
        "  {:<28} {produce:>9.0} rec/s  ({} B records)",
        "ceiling: bare produce",
        payload.len()
    );
    let composed = 1.0 / (1.0 / rate(http.ok, http.elapsed) + 1.0 / produce);
    println!(
        "  {:<28} {composed:>9.0} req/s  (1 / (1/http + 1/produce))",
        "composed ceiling"
    );

    // The bridge at full speed.
    let full = drive(&format!("http://{addr}{PATH}"), bodies.clone(), conc, None).await?;
    full.print("bridge, closed loop");
    let full_rate = rate(full.ok, full.elapsed);
    println!(
        "  ratio to composed ceiling:   {:.0}% (target ≥ 50%)",
        100.0 * full_rate / composed
    );

    // Half the maximum rate, paced: the latency a provider sees.
    let half = full_rate / 2.0;
    let paced_n = ((half * 10.0) as usize).clamp(1_000, 200_000);
    let paced_bodies: Arc<Vec<(String, String)>> =
        Arc::new((n..n + paced_n).map(|i| callback(&public, i)).collect());
    let paced = drive(
        &format!("http://{addr}{PATH}"),
        paced_bodies,
        conc,
        Some(half),
    )
    .await?;
    paced.print(&format!("bridge, paced at {half:.0}/s"));
    println!(
        "  p99 at half the max rate:    {:.2} ms (target ≤ 25 ms)",
        paced.pct(0.99).as_secs_f64() * 1e3
    );

    // normalize: raw topic → delivery_receipts, against COPY of the same rows.
    let accepted = (full.ok + paced.ok) as i64;
    let consume = rate(
        accepted as usize,
        super::consume_ceiling(
            &settings,
            settings.topic("webhooks-status")?,
            accepted as usize,
        )
        .await?,
    );
    println!(
        "  {:<28} {consume:>9.0} rec/s",
        "ceiling: consume raw topic"
    );
    // The machine's speed drifts by a third within minutes (a shared VM), so
    // one COPY against one stage run says little: each round times a COPY and
    // then the stage (a fresh group over the same records) back to back into
    // an emptied table, and the median round's ratio is the figure.
    let client = pool.get().await?;
    // One producer for every round: a new one waits ~0.5 s for its id.
    let stage_deps = Deps {
        settings: settings.clone(),
        pool: pool.clone(),
        producer: ese::kafka::Producer::new(&settings.kafka)?,
        codec,
    };
    let mut ratios = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        let copy = copy_ceiling(&client, &sample, accepted).await?;
        let mut deps = stage_deps.clone();
        if let Some(p) = deps.settings.pipelines.get_mut("normalize") {
            p.group_id = format!("{}.round{round}", p.group_id);
        }
        let took = super::time_stage(
            &deps,
            "normalize",
            "SELECT count(*) FROM delivery_receipts",
            accepted,
        )
        .await?;
        client
            .batch_execute(
                "BEGIN; SET LOCAL ese.retention = 'on'; TRUNCATE delivery_receipts; COMMIT",
            )
            .await?;
        let stage = rate(accepted as usize, took);
        println!(
            "  round {round}: COPY {copy:>7.0} rows/s, normalize stage {stage:>7.0} records/s, ratio {:.0}%",
            100.0 * stage / copy
        );
        ratios.push(stage / copy);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "  normalize ratio to COPY:     {:.0}% median of {ROUNDS} rounds (range {:.0}–{:.0}%; target ≥ 50%)",
        100.0 * ratios[ROUNDS / 2],
        100.0 * ratios[0],
        100.0 * ratios[ROUNDS - 1]
    );
    // Closed before the scratch database is dropped, which would otherwise
    // end these connections under the pool and log each as an error.
    drop(client);
    pool.close();
    Ok(())
}

/// Rows/s of a binary `COPY` of `n` audit rows shaped like the stage's (the
/// statement it uses when its rows are new, the payload written as it writes
/// it) into `delivery_receipts`, which is emptied again afterwards.
async fn copy_ceiling(
    client: &tokio_postgres::Client,
    sample: &WebhookRaw,
    n: i64,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let sink = client.copy_in(normalize::COPY_RECEIPTS).await?;
    let writer = BinaryCopyInWriter::new(sink, normalize::RECEIPT_TYPES);
    futures::pin_mut!(writer);
    let raw = ese::records::ParamsJson(&sample.params);
    let now = chrono::Utc::now();
    for i in 0..n {
        let (event_id, id) = (uuid::Uuid::new_v4(), uuid::Uuid::now_v7());
        let sid = format!("SM{i:032x}");
        writer
            .as_mut()
            .write(&[
                &event_id,
                &sid,
                &"sent",
                &None::<i32>,
                &raw,
                &now,
                &true,
                &id,
            ])
            .await?;
    }
    writer.finish().await?;
    let copy = rate(n as usize, started.elapsed());
    client
        .batch_execute("BEGIN; SET LOCAL ese.retention = 'on'; TRUNCATE delivery_receipts; COMMIT")
        .await?;
    Ok(copy)
}
