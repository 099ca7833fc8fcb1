//! The `ese` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::engine;
use crate::stages::{self, Deps};

/// Event Stream Engine: provider webhooks, consent, receipts and campaigns over Kafka into PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "ese", version, about)]
pub struct Cli {
    /// Extra TOML config file (over the embedded defaults, under the environment).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending database migrations (a no-op when there are none).
    Migrate,
    /// Manage Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Run one or more stages in this process until SIGINT/SIGTERM.
    Run {
        /// Stage names (see `pipelines/`).
        #[arg(required = true, value_parser = clap::builder::PossibleValuesParser::new(stages::ALL))]
        stages: Vec<String>,
    },
    /// The webhook bridge (provider callbacks → Kafka), `/healthz`, `/readyz`, `/metrics`.
    Serve,
    /// Everything in one process: migrations, topics, the bridge with the
    /// admin API, every stage and the scheduler, and the embedded broker when
    /// no brokers are configured.
    Up {
        /// Also run the provider simulator (`provider-sim.listen`) and send to
        /// it, unless `provider.base-url` is set to something else explicitly.
        #[arg(long)]
        with_provider_sim: bool,
    },
    /// Throughput benchmarks with their ceilings measured in the same run
    /// (fresh database and topics; embedded broker unless KAFKA_BROKERS is set).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// The Twilio-compatible provider simulator (`[provider-sim]` config):
    /// accepts sends, posts signed status callbacks, reports stats at /sim/stats.
    /// Credentials from TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN.
    ProviderSim {
        /// Address to listen on (default `provider-sim.listen`, 127.0.0.1:8099).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Process a stage's input again: move its consumer group's offsets
    /// (the stage must be stopped). Prints the plan first.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["to", "to_offset", "to_time"])))]
    Replay {
        /// Stage whose consumer group is moved.
        stage: String,
        /// `earliest`: every record still on the input topics.
        #[arg(long, value_parser = ["earliest"])]
        to: Option<String>,
        /// `[TOPIC/]PARTITION:OFFSET[,…]`; partitions not named are left alone.
        #[arg(long, value_name = "OFFSETS")]
        to_offset: Option<String>,
        /// The first record at or after this RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        to_time: Option<String>,
        /// Show the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// After moving, show a progress bar until the (restarted) stage has caught up.
        #[arg(long)]
        follow: bool,
    },
    /// Per stage: consumer group state and members, lag per partition, DLQ
    /// depth and the newest dead letter's reason.
    Status {
        /// Refresh every 2 s until interrupted.
        #[arg(long)]
        watch: bool,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list them, or put them back on their source topic.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The whole loop on a running `ese up --with-provider-sim` (same config
    /// and ESE_ADMIN_TOKEN): seeds users, creates a template, a segment and a
    /// campaign, starts it and shows its messages reaching DELIVERED.
    Demo {
        /// Recipients.
        #[arg(long, default_value_t = 25)]
        users: u32,
        /// Give up after this long.
        #[arg(long, default_value = "120s", value_parser = humantime_serde::re::humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Run the embedded Kafka-API broker alone.
    Broker {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9092")]
        listen: String,
        /// `memory://NAME/` (lost on exit), `sqlite://RELATIVE/PATH` or
        /// `sqlite:///ABSOLUTE/PATH` (both survive kill -9 and restart).
        #[arg(long, default_value = "memory://ese/")]
        storage: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
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

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show a stage's dead letters: position, headers, readable body.
    List {
        stage: String,
        /// Only the newest N.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Put a stage's dead letters back on their source topic (after a fix).
    /// Repeating it is harmless: every sink is idempotent.
    Replay {
        stage: String,
        /// Only those whose reason contains this text (case-insensitive).
        #[arg(long)]
        filter: Option<String>,
        /// Show what would go back, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create every topic the pipelines name (idempotent).
    Create,
}

/// Entry point of the binary: runs the command, prints a one-line reason on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    crate::http::install_crypto();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ese: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ese: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,tansu=warn,librdkafka=warn,refinery_core=warn,tokio_postgres=warn",
        )
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    let uses_kafka = matches!(
        cli.command,
        Command::Topics { .. }
            | Command::Run { .. }
            | Command::Serve
            | Command::Up { .. }
            | Command::Replay { .. }
            | Command::Status { .. }
            | Command::Dlq { .. }
    );
    if uses_kafka && !settings.kafka.brokers.trim().is_empty() {
        // Refused credentials or an untrusted certificate end the command
        // here, with the broker's words, instead of being retried forever.
        crate::kafka::check_connection(&settings.kafka, std::time::Duration::from_secs(30)).await?;
    }
    match cli.command {
        Command::Migrate => {
            let applied = crate::db::migrate(&settings.database.url).await?;
            if applied.is_empty() {
                println!("database is up to date");
            } else {
                for m in applied {
                    println!("applied {m}");
                }
            }
            Ok(())
        }
        Command::Topics {
            command: TopicsCommand::Create,
        } => {
            let topics = settings.all_topics();
            let created = crate::kafka::create_topics(&settings.kafka, &topics).await?;
            println!(
                "{} topics ({} created now): {}",
                topics.len(),
                created.len(),
                topics.join(", ")
            );
            Ok(())
        }
        Command::Run { stages } => {
            let shutdown = CancellationToken::new();
            engine::cancel_on_signal(shutdown.clone());
            let deps = Deps::new(&settings)?;
            let metrics = tokio::spawn(crate::metrics::serve(
                settings.metrics.listen,
                shutdown.clone(),
            ));
            let result = engine::run_stages(&stages, &deps, shutdown.clone()).await;
            shutdown.cancel();
            let _ = metrics.await;
            result
        }
        Command::Up { with_provider_sim } => up(settings, with_provider_sim).await,
        Command::Serve => {
            let shutdown = CancellationToken::new();
            engine::cancel_on_signal(shutdown.clone());
            let deps = Deps::new(&settings)?;
            let tokens = crate::bridge::tokens_from_env();
            if tokens.is_empty() {
                eprintln!(
                    "ese: warning: TWILIO_AUTH_TOKEN is not set; every webhook will be refused (403)"
                );
            }
            let router = engine::http_router(&settings, &deps, tokens).await?;
            println!(
                "ese serve: webhooks and admin API on http://{}",
                settings.bridge.listen
            );
            crate::bridge::serve(settings.bridge.listen, router, shutdown).await
        }
        Command::Bench {
            command:
                BenchCommand::E2e {
                    rate,
                    seconds,
                    campaign_users,
                },
        } => crate::bench::e2e(settings, rate, seconds, campaign_users).await,
        Command::Bench {
            command: BenchCommand::Users { records },
        } => crate::bench::users(settings, records).await,
        Command::Bench {
            command:
                BenchCommand::Webhooks {
                    requests,
                    concurrency,
                },
        } => crate::bench::webhooks(settings, requests, concurrency).await,
        Command::Bench {
            command:
                BenchCommand::Sender {
                    seconds,
                    ceiling_sends,
                },
        } => crate::bench::sender(settings, seconds, ceiling_sends).await,
        Command::Bench {
            command: BenchCommand::Fanout { users },
        } => crate::bench::fanout(settings, &users).await,
        Command::Bench {
            command: BenchCommand::Receipts { records },
        } => crate::bench::receipts(settings, records).await,
        Command::ProviderSim { listen } => {
            let mut cfg = settings.provider_sim.clone();
            if let Some(l) = listen {
                cfg.listen = l;
            }
            let shutdown = CancellationToken::new();
            engine::cancel_on_signal(shutdown.clone());
            let (addr, task) = crate::sim::start(cfg, shutdown).await?;
            println!(
                "ese provider-sim: http://{addr}/2010-04-01/Accounts/{{AccountSid}}/Messages.json, stats at /sim/stats"
            );
            task.await?
        }
        Command::Demo { users, timeout } => crate::demo::run(&settings, users, timeout).await,
        Command::Replay {
            stage,
            to,
            to_offset,
            to_time,
            dry_run,
            follow,
        } => {
            let target = match (to, to_offset, to_time) {
                (_, Some(o), _) => crate::ops::Target::parse_offsets(&o)?,
                (_, _, Some(t)) => crate::ops::Target::parse_time(&t)?,
                _ => crate::ops::Target::Earliest,
            };
            replay(&settings, &stage, &target, dry_run, follow).await
        }
        Command::Status { watch, json } => loop {
            let all = crate::ops::status(&settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                if watch {
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", crate::ops::render_status(&all));
            }
            if !watch {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        },
        Command::Dlq {
            command: DlqCommand::List { stage, limit },
        } => {
            let codec = crate::codec::Codec::new(&settings.schema_registry)?;
            let mut letters = crate::ops::dead_letters(&settings, &stage).await?;
            if let Some(n) = limit {
                letters.sort_by_key(|d| rdkafka::Message::timestamp(&d.message).to_millis());
                letters = letters.split_off(letters.len().saturating_sub(n));
            }
            for d in &letters {
                let m = &d.message;
                println!(
                    "{}[{}]@{}",
                    settings.pipeline(&stage)?.dlq,
                    rdkafka::Message::partition(m),
                    rdkafka::Message::offset(m)
                );
                for (k, v) in d.headers() {
                    println!("  {k}: {v}");
                }
                println!("  body: {}", d.readable_body(&codec).await);
            }
            println!("{} dead letter(s)", letters.len());
            Ok(())
        }
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    stage,
                    filter,
                    dry_run,
                },
        } => {
            let letters = crate::ops::dead_letters(&settings, &stage).await?;
            let chosen: Vec<_> = letters
                .into_iter()
                .filter(|d| match &filter {
                    None => true,
                    Some(f) => d
                        .reason()
                        .unwrap_or_default()
                        .to_lowercase()
                        .contains(&f.to_lowercase()),
                })
                .collect();
            for d in &chosen {
                println!(
                    "{} {}[{}]@{}: {}",
                    if dry_run { "would replay" } else { "replaying" },
                    d.header("ese.source.topic").unwrap_or_default(),
                    d.header("ese.source.partition").unwrap_or_default(),
                    d.header("ese.source.offset").unwrap_or_default(),
                    d.reason().unwrap_or_default()
                );
            }
            if !dry_run {
                let n = crate::ops::replay_dead_letters(&settings, &stage, &chosen).await?;
                println!("{n} dead letter(s) back on their source topics");
            }
            Ok(())
        }
        Command::Broker { listen, storage } => {
            // tansu resolves sqlite paths against the working directory; from
            // "/" an absolute `sqlite:///var/lib/ese/broker.db` means what it says.
            if storage.starts_with("sqlite:///") {
                std::env::set_current_dir("/").map_err(|e| {
                    anyhow::anyhow!("cannot change to / for an absolute sqlite path: {e}")
                })?;
            }
            let broker = crate::broker::start(&listen, &storage).await?;
            println!(
                "ese broker: Kafka API on {} (storage {storage})",
                broker.bootstrap
            );
            let shutdown = CancellationToken::new();
            engine::cancel_on_signal(shutdown.clone());
            shutdown.cancelled().await;
            drop(broker);
            Ok(())
        }
    }
}

async fn replay(
    settings: &Settings,
    stage: &str,
    target: &crate::ops::Target,
    dry_run: bool,
    follow: bool,
) -> anyhow::Result<()> {
    let plan = crate::ops::replay_plan(settings, stage, target).await?;
    print!("{}", plan.render());
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    crate::ops::apply_replay(settings, &plan).await?;
    println!(
        "consumer group {} moved; start the stage to process again",
        plan.group
    );
    if !follow {
        return Ok(());
    }
    let total = plan.again().max(0) as u64;
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} records ({per_sec}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(format!("{stage} catching up"));
    loop {
        let left = crate::ops::remaining(settings, &plan).await?;
        bar.set_position(total.saturating_sub(left as u64));
        if left == 0 {
            bar.finish_and_clear();
            println!("{stage} caught up: {total} records processed again");
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

async fn up(mut settings: Settings, with_provider_sim: bool) -> anyhow::Result<()> {
    let _broker = if settings.kafka.brokers.trim().is_empty() {
        let b = crate::broker::start(&settings.broker.listen, &settings.broker.storage).await?;
        settings.kafka.brokers = b.bootstrap.clone();
        Some(b)
    } else {
        None
    };
    let applied = crate::db::migrate(&settings.database.url).await?;
    let topics = settings.all_topics();
    crate::kafka::create_topics(&settings.kafka, &topics).await?;
    let shutdown = CancellationToken::new();
    engine::cancel_on_signal(shutdown.clone());
    let sim = if with_provider_sim {
        let (addr, task) =
            crate::sim::start(settings.provider_sim.clone(), shutdown.clone()).await?;
        if settings.provider.base_url == crate::config::TWILIO_API {
            settings.provider.base_url = format!("http://{addr}");
        }
        Some((addr, task))
    } else {
        None
    };
    let deps = Deps::new(&settings)?;
    let metrics = tokio::spawn(crate::metrics::serve(
        settings.metrics.listen,
        shutdown.clone(),
    ));
    let tokens = crate::bridge::tokens_from_env();
    let signed = !tokens.is_empty();
    let admin = crate::campaigns::api::token_from_env().is_some();
    let router = engine::http_router(&settings, &deps, tokens).await?;
    let bridge_task = tokio::spawn(crate::bridge::serve(
        settings.bridge.listen,
        router,
        shutdown.clone(),
    ));
    println!("ese up");
    match &_broker {
        Some(b) => println!(
            "  kafka      {} (embedded broker, storage {})",
            b.bootstrap, settings.broker.storage
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
        settings.bridge.listen,
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
    println!("  stages     {}", stages::ALL.join(", "));
    println!("  topics     {}", topics.len());
    let names: Vec<String> = stages::ALL.iter().map(|s| s.to_string()).collect();
    let result = engine::run_stages(&names, &deps, shutdown.clone()).await;
    shutdown.cancel();
    let _ = metrics.await;
    if let Ok(Err(e)) = bridge_task.await {
        return result.and(Err(e));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::Cli;

    #[test]
    fn every_command_and_argument_is_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
