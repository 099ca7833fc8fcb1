//! The pipeline benchmarks: throughput measured against, in the same run,
//! the bare ceilings a stage stands on, and the ratio printed. Outside the
//! engine's library: `cargo bench --bench pipeline -- users` (a release
//! build; `-- --help` lists them). Each runs on a fresh database and fresh
//! topics, on the embedded broker unless `KAFKA_BROKERS` is set.

// The embedded broker and the load generator run in this process on the
// allocator `ese` runs on: on glibc's malloc the broker spent a fifth of
// its time allocating, which `ese up` never does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use ese::codec::Codec;
use ese::config::Settings;
use ese::runner::Deps;
use ese::stages::users::UserUpsert;

mod e2e;
mod fanout;
mod ids;
mod retention;
mod sender;
mod sinks;
mod webhooks;
use e2e::e2e;
use fanout::fanout;
use ids::ids;
use retention::retention;
use sender::sender;
use sinks::receipts;
use webhooks::webhooks;

use clap::{Parser, Subcommand};

/// Throughput benchmarks with their ceilings measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "pipeline")]
struct Args {
    /// Extra TOML config file (over the embedded defaults, under the environment).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// `cargo bench` passes it; ignored.
    #[arg(long, hide = true, global = true)]
    bench: bool,
    #[command(subcommand)]
    command: BenchCommand,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tansu=off")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    ese::http::install_crypto();
    let run = async {
        let settings = Settings::load(args.config.as_deref())?;
        match args.command {
            BenchCommand::E2e {
                rate,
                seconds,
                campaign_users,
            } => e2e(settings, rate, seconds, campaign_users).await,
            BenchCommand::Users { records } => users(settings, records).await,
            BenchCommand::Webhooks {
                requests,
                concurrency,
            } => webhooks(settings, requests, concurrency).await,
            BenchCommand::Sender {
                seconds,
                ceiling_sends,
            } => sender(settings, seconds, ceiling_sends).await,
            BenchCommand::Fanout { users } => fanout(settings, &users).await,
            BenchCommand::Receipts { records } => receipts(settings, records).await,
            BenchCommand::Retention { rows } => retention(settings, rows).await,
            BenchCommand::Ids { rows } => ids(settings, rows).await,
        }
    };
    let result = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The engine as one process: signed status webhooks at a rate through
    /// bridge → normalize → receipts (latency, lag, CPU, RSS), then a campaign
    /// through fan-out → sender → simulator → callbacks → DELIVERED, with the
    /// broker and COPY ceilings.
    E2e {
        /// Webhooks per second.
        #[arg(long, default_value_t = 5000)]
        rate: u32,
        /// Seconds of webhook load.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Recipients of the campaign run.
        #[arg(long, default_value_t = 100_000)]
        campaign_users: i64,
    },
    /// sender against the provider simulator: rate accuracy at 100/s and
    /// 1,000/s, then the ceiling with limits off.
    Sender {
        /// Seconds at each configured rate.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Sends in the limits-off run.
        #[arg(long, default_value_t = 50_000)]
        ceiling_sends: u64,
    },
    /// fanout stage: a campaign over N users → messages and acknowledged send
    /// records, in a child process (peak RSS reported), against COPY.
    Fanout {
        /// Audience sizes, one run each.
        #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
        users: Vec<i64>,
    },
    /// users stage: topic → committed rows, against bare consume and COPY.
    Users {
        /// Upserts to push through.
        #[arg(long, default_value_t = 100_000)]
        records: usize,
    },
    /// receipts and consent stages: topic → rows, against the same stage SQL without Kafka.
    Receipts {
        /// Callbacks (and consent decisions) to push through.
        #[arg(long, default_value_t = 50_000)]
        records: usize,
    },
    /// Message ids: BIGSERIAL against gen_random_uuid() and engine-made
    /// UUIDv7, inserted as the fan-out pages and claimed as the sender does.
    Ids {
        /// Messages per kind of id.
        #[arg(long, default_value_t = 2_000_000)]
        rows: usize,
    },
    /// Retention of the audit trail: delivery_receipts of N rows over ten
    /// years, the seven-year-old ones deleted while a writer keeps inserting,
    /// against that writer alone.
    Retention {
        /// Receipts in the table (inbound_events: a tenth).
        #[arg(long, default_value_t = 10_000_000)]
        rows: i64,
    },
    /// Signed status callbacks over HTTP into the bridge, against bare HTTP
    /// and bare produce; then normalize into Postgres against COPY.
    Webhooks {
        /// Requests in the closed-loop run.
        #[arg(long, default_value_t = 50_000)]
        requests: usize,
        /// Requests in flight. Each answer waits for the broker's
        /// acknowledgement (~2 ms), so a closed loop of C requests cannot pass
        /// C / 2 ms whatever the CPU: 64 tops out near 32 k/s. The ceilings
        /// are rates at saturation, and so must the bridge's be.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
}

/// A throwaway database and topic prefix for one benchmark run, dropped at the end.
pub struct Scratch {
    pub settings: Settings,
    pub db_name: String,
    admin_url: String,
    _broker: Option<ese::broker::EmbeddedBroker>,
    /// The embedded broker's durable data folder, removed at the end.
    data_dir: Option<std::path::PathBuf>,
}

impl Scratch {
    /// Starts the embedded broker if none is configured (on `broker.storage`
    /// when set, e.g. `ESE__BROKER__STORAGE=memory://ese-bench/`; else
    /// durable, as `ese up` runs by default, in a fresh data folder), creates
    /// a fresh database and prefixes every topic and group with a fresh name.
    pub async fn new(mut settings: Settings) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut data_dir = None;
        let broker = if settings.kafka.brokers.trim().is_empty() {
            if settings.broker.storage.trim().is_empty() {
                let dir = std::env::temp_dir().join(format!("ese-bench-{}", &id[..12]));
                settings.broker.data_dir = dir.display().to_string();
                data_dir = Some(dir);
            }
            let storage = settings.broker.storage_url()?;
            eprintln!("bench: embedded broker, storage {storage}");
            let b = ese::broker::start("127.0.0.1:0", &storage).await?;
            settings.kafka.brokers = b.bootstrap.clone();
            Some(b)
        } else {
            eprintln!("bench: brokers {}", settings.kafka.brokers);
            None
        };
        let db_name = format!("ese_bench_{}", &id[..12]);
        let admin_url = settings.database.url.clone();
        let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await?;
        let mut url = url::Url::parse(&admin_url)?;
        url.set_path(&format!("/{db_name}"));
        settings.database.url = url.to_string();
        ese::db::migrate(&settings.database.url).await?;
        let prefix = format!("bench{}", &id[..8]);
        for p in settings.pipelines.values_mut() {
            p.group_id = format!("{prefix}.{}", p.group_id);
            for t in p.inputs.iter_mut().chain(p.outputs.values_mut()) {
                *t = format!("{prefix}.{t}");
            }
            p.dlq = format!("{prefix}.{}", p.dlq);
        }
        for t in settings.topics.values_mut() {
            *t = format!("{prefix}.{t}");
        }
        ese::kafka::ensure_topics(&settings.kafka, &settings.topic_retention()).await?;
        Ok(Self {
            settings,
            db_name,
            admin_url,
            _broker: broker,
            data_dir,
        })
    }

    /// Drops the scratch database (and the broker's data folder).
    pub async fn cleanup(self) -> anyhow::Result<()> {
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let (admin, conn) = tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            ))
            .await?;
        Ok(())
    }
}

/// Starts this binary as `ese ARGS…` on `settings` (written to a temp config
/// file named after `name`, returned for removal), stdout discarded.
pub fn spawn_ese(
    settings: &Settings,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(std::process::Child, std::path::PathBuf)> {
    let config = std::env::temp_dir().join(format!("{name}.toml"));
    std::fs::write(&config, toml::to_string(settings)?)?;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ese"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .env("DATABASE_URL", &settings.database.url)
        .env("KAFKA_BROKERS", &settings.kafka.brokers)
        .env(
            "RUST_LOG",
            std::env::var("ESE_BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    Ok((child, config))
}

fn bench_phone(i: usize) -> String {
    format!("+1415{:03}{:04}", 200 + (i / 10_000) % 800, i % 10_000)
}

/// Records/s of producing `n` records (record `i` is `record(i)`: key,
/// payload) to `topic` once `producer` holds its id, with 5,000 sends in
/// flight throughout: the broker's rate, not one batch's latency.
pub async fn produce_ceiling<'a>(
    producer: &ese::kafka::Producer,
    topic: &str,
    n: usize,
    record: impl Fn(usize) -> (Option<Vec<u8>>, &'a [u8]),
) -> anyhow::Result<f64> {
    anyhow::ensure!(
        producer.wait_ready(Duration::from_secs(30)).await,
        "produce ceiling: the producer got no producer id from the broker within 30 s"
    );
    let started = Instant::now();
    let mut sends = futures::stream::iter(0..n)
        .map(|i| {
            let (key, payload) = record(i);
            async move {
                let mut r = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
                if let Some(key) = &key {
                    r = r.key(key.as_slice());
                }
                producer.send(r, Duration::from_secs(30)).await
            }
        })
        .buffer_unordered(5000);
    while let Some(sent) = sends.next().await {
        sent.map_err(|(e, _)| anyhow::anyhow!("produce ceiling: {e}"))?;
    }
    Ok(rate(n, started.elapsed()))
}

/// Rate in records per second.
pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// Consumes `n` records of `topic` with a fresh group, as fast as rdkafka goes.
pub async fn consume_ceiling(
    settings: &Settings,
    topic: &str,
    n: usize,
) -> anyhow::Result<Duration> {
    let group = format!("ceiling-{}", uuid::Uuid::new_v4().simple());
    let consumer: StreamConsumer =
        ese::kafka::consumer_config(&settings.kafka, &group)?.create()?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut seen = 0usize;
    let mut stream = consumer.stream();
    while seen < n {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(m))) => {
                std::hint::black_box(m.payload());
                seen += 1;
            }
            Ok(Some(Err(e))) => anyhow::bail!("consume ceiling: {e}"),
            Ok(None) | Err(_) => anyhow::bail!("consume ceiling: stalled at {seen}/{n}"),
        }
    }
    Ok(started.elapsed())
}

/// `ese bench users --records N`.
pub async fn users(settings: Settings, records: usize) -> anyhow::Result<()> {
    let scratch = Scratch::new(settings).await?;
    let result = users_in(&scratch, records).await;
    scratch.cleanup().await?;
    result
}

async fn users_in(scratch: &Scratch, n: usize) -> anyhow::Result<()> {
    let settings = &scratch.settings;
    let topic = settings.pipeline("users")?.inputs[0].clone();
    let codec = Codec::single_object()?;
    let producer = ese::kafka::Producer::new(&settings.kafka)?;

    println!(
        "users bench: {n} upserts, broker {}, postgres db {}",
        settings.kafka.brokers, scratch.db_name
    );
    let mut payloads = Vec::with_capacity(n);
    for i in 0..n {
        let attributes: BTreeMap<String, serde_json::Value> = [
            ("name".to_string(), serde_json::json!(format!("user {i}"))),
            ("city".to_string(), serde_json::json!("Paris")),
            ("age".to_string(), serde_json::json!(20 + (i % 60) as i64)),
        ]
        .into();
        let u = UserUpsert {
            consent: None,
            event_id: None,
            phone: bench_phone(i),
            attributes,
            occurred_at: 1_700_000_000_000 + i as i64,
        };
        payloads.push((u.phone.clone(), codec.encode(&topic, &u).await?, u));
    }
    let started = Instant::now();
    for chunk in payloads.chunks(5000) {
        let futures = chunk.iter().map(|(k, p, _)| {
            producer.send(
                FutureRecord::to(&topic)
                    .key(k.as_str())
                    .payload(p.as_slice()),
                Duration::from_secs(60),
            )
        });
        for r in futures::future::join_all(futures).await {
            r.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        }
    }
    let produce = started.elapsed();
    println!(
        "  produce (setup)        {:>10.0} records/s",
        rate(n, produce)
    );

    // Ceiling 1: bare consume of the same records.
    let consume = consume_ceiling(settings, &topic, n).await?;
    println!(
        "  ceiling: consume       {:>10.0} records/s",
        rate(n, consume)
    );

    // Ceiling 2: binary COPY of the same rows into the same table.
    let pool = ese::db::pool(&settings.database)?;
    let client = pool.get().await?;
    let started = Instant::now();
    let sink = client
        .copy_in(
            "COPY users (phone_e164, attributes, attribute_times, last_updated) FROM STDIN BINARY",
        )
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[Type::TEXT, Type::JSONB, Type::JSONB, Type::TIMESTAMPTZ],
    );
    futures::pin_mut!(writer);
    for (phone, _, u) in &payloads {
        let attrs = serde_json::Value::Object(u.attributes.clone().into_iter().collect());
        let at = chrono::DateTime::from_timestamp_millis(u.occurred_at).unwrap_or_default();
        let times = serde_json::Value::Object(
            u.attributes
                .keys()
                .map(|k| (k.clone(), serde_json::json!(at)))
                .collect(),
        );
        writer.as_mut().write(&[phone, &attrs, &times, &at]).await?;
    }
    writer.finish().await?;
    let copy = started.elapsed();
    println!("  ceiling: COPY          {:>10.0} rows/s", rate(n, copy));
    client.batch_execute("TRUNCATE users CASCADE").await?;
    drop(client);

    // The stage itself: topic → committed rows.
    let deps = Deps {
        settings: settings.clone(),
        pool: pool.clone(),
        producer,
        codec,
    };
    let stage = time_stage(&deps, "users", "SELECT count(*) FROM users", n as i64).await?;
    let stage_rate = rate(n, stage);
    let ceiling = rate(n, consume).min(rate(n, copy));
    println!("  users stage            {:>10.0} records/s", stage_rate);
    println!(
        "  ratio to the lower ceiling: {:.0}% (target ≥ 50%)",
        100.0 * stage_rate / ceiling
    );
    Ok(())
}

/// The samples of metric `name` on a rendered Prometheus page: (labels as
/// written between the braces, value).
pub fn samples<'a>(page: &'a str, name: &str) -> impl Iterator<Item = (&'a str, f64)> {
    let prefix = format!("{name}{{");
    page.lines().filter_map(move |line| {
        let (labels, value) = line.strip_prefix(prefix.as_str())?.split_once("} ")?;
        Some((labels, value.trim().parse().ok()?))
    })
}

/// The value of label `key` in `labels` (as [`samples`] gives them).
pub fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels
        .split(',')
        .find_map(|l| l.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
}

/// `ese_stage_phase_seconds` of `stage` from a rendered metrics page: phase →
/// (sum of seconds, count).
pub fn phase_totals(page: &str, stage: &str) -> HashMap<String, (f64, f64)> {
    let mut totals: HashMap<String, (f64, f64)> = HashMap::new();
    for (part, is_sum) in [("sum", true), ("count", false)] {
        for (labels, v) in samples(page, &format!("ese_stage_phase_seconds_{part}")) {
            if label(labels, "stage") != Some(stage) {
                continue;
            }
            if let Some(phase) = label(labels, "phase") {
                let slot = totals.entry(phase.to_string()).or_default();
                if is_sum { slot.0 = v } else { slot.1 = v }
            }
        }
    }
    totals
}

/// `<stage> batches: N, mean ms per batch: gather … produce …` between two
/// [`phase_totals`] readings.
pub fn phase_line(
    stage: &str,
    before: &HashMap<String, (f64, f64)>,
    after: &HashMap<String, (f64, f64)>,
) -> String {
    let count =
        |m: &HashMap<String, (f64, f64)>, name: &str| m.get(name).copied().unwrap_or_default();
    let batches = count(after, "process").1 - count(before, "process").1;
    let mut line = format!("  {stage} batches: {batches:.0}, mean ms per batch:");
    for name in [
        "gather", "decode", "begin", "process", "commit", "acks", "produce",
    ] {
        let ((sum, n), (sum0, n0)) = (count(after, name), count(before, name));
        if n > n0 {
            line += &format!(" {name} {:.1}", 1e3 * (sum - sum0) / (n - n0));
        }
    }
    line
}

/// Runs `stage` from its topic until it has committed `target` records (the
/// runner's `ese_stage_records_processed_total`, read in-process every 20 ms:
/// polling a `count(*)` would scan the growing table and slow the stage it
/// measures); then checks with `done` (a count query) that the rows are there.
/// The time returned runs from the stage's first consumed record: joining the
/// consumer group comes before it, once per start and not per record, and is
/// printed apart. So does getting the producer's id: a new idempotent
/// producer has it only after ~0.5 s, and the first batches would wait for it
/// inside the timing.
pub async fn time_stage(
    deps: &Deps,
    stage: &str,
    done: &str,
    target: i64,
) -> anyhow::Result<Duration> {
    let ready = Instant::now();
    anyhow::ensure!(
        deps.producer.wait_ready(Duration::from_secs(30)).await,
        "{stage}: the producer got no producer id from the broker within 30 s"
    );
    let ready = ready.elapsed();
    let handle = ese::metrics::handle();
    let count = |metric: &str| {
        samples(&handle.render(), metric)
            .find(|(labels, _)| label(labels, "stage") == Some(stage))
            .map_or(0, |(_, v)| v as i64)
    };
    let processed = || count("ese_stage_records_processed_total");
    let consumed = || count("ese_stage_records_consumed_total");
    let (before, consumed_before) = (processed(), consumed());
    let phases_before = phase_totals(&handle.render(), stage);
    let token = CancellationToken::new();
    let (d, t, name) = (deps.clone(), token.clone(), stage.to_string());
    let started = Instant::now();
    let task = tokio::spawn(async move { ese::stages::run(&name, d, t).await });
    let mut first: Option<Instant> = None;
    loop {
        if first.is_none() && consumed() > consumed_before {
            first = Some(Instant::now());
        }
        let n = processed() - before;
        if n >= target {
            break;
        }
        if task.is_finished() {
            anyhow::bail!("{stage} stopped early at {n}/{target}");
        }
        // Finely until the first record, so the start is read to a few ms.
        let poll = if first.is_some() { 20 } else { 2 };
        tokio::time::sleep(Duration::from_millis(poll)).await;
    }
    let first = first.unwrap_or(started);
    let took = first.elapsed();
    println!(
        "  {stage}: producer ready in {:.0} ms, first record {:.0} ms after the start (group join), {:.0} ms from it to the last",
        ready.as_secs_f64() * 1e3,
        (first - started).as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e3
    );
    token.cancel();
    task.await??;
    let phases = phase_totals(&handle.render(), stage);
    println!("{}", phase_line(stage, &phases_before, &phases));
    let rows: i64 = deps.pool.get().await?.query_one(done, &[]).await?.get(0);
    anyhow::ensure!(
        rows >= target,
        "{stage} reported {target} records committed but `{done}` counts {rows}"
    );
    Ok(took)
}
