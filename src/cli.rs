//! The `ese` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::engine;
use crate::stages;

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
        #[arg(required = true, value_parser = clap::builder::PossibleValuesParser::new(stages::names()))]
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
    /// Delete the audit trail's expired rows (delivery_receipts and
    /// inbound_events older than `retention.audit`), in batches, with
    /// progress; the scheduler does the same every `retention.interval`.
    Retention {
        /// Count what has expired, per table; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Judge expiry as of this RFC 3339 time instead of now (what a later
        /// run would remove).
        #[arg(long, value_name = "TIME", value_parser = crate::ops::parse_as_of)]
        as_of: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// The Avro schemas against the schema registry.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// GET a URL; exit 0 on a 2xx answer, else print the status or the error
    /// and exit 1. The container health probe (`/healthz` of a running
    /// process), so images need no curl; reads no configuration.
    Healthcheck {
        /// What to probe, e.g. `http://127.0.0.1:8080/healthz`.
        url: String,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime_serde::re::humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Run the embedded Kafka-API broker alone.
    Broker {
        /// Address to listen on (default `broker.listen`, 127.0.0.1:9092).
        #[arg(long)]
        listen: Option<String>,
        /// `memory://NAME/` (lost on exit), `file:///ABSOLUTE/DIR` (a
        /// journal in DIR) or `sqlite:///ABSOLUTE/PATH` (both survive kill -9
        /// and restart). Default `broker.storage`: a journal in
        /// `broker.data-dir`.
        #[arg(long)]
        storage: Option<String>,
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
pub enum SchemasCommand {
    /// Whether `schemas/` is BACKWARD compatible with what the schema
    /// registry holds for each topic (`<topic>-value`); non-zero exit if not.
    Check,
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
    let code = match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ese: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Whatever still runs once the command has returned (a metrics refresh
    // waiting on a broker that is gone) is abandoned, not waited for: the
    // command already finished its work in order.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
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
    if let Command::Healthcheck { url, timeout } = &cli.command {
        // Before the configuration is loaded: a probe must not fail on it.
        return engine::healthcheck::healthcheck(url, *timeout).await;
    }
    let mut settings = Settings::load(cli.config.as_deref())?;
    let uses_kafka = matches!(
        cli.command,
        Command::Topics { .. }
            | Command::Run { .. }
            | Command::Serve
            | Command::Up { .. }
            | Command::Replay { .. }
            | Command::Status { .. }
            | Command::Dlq { .. }
            | Command::Demo { .. }
    );
    let talks_to_a_running_engine = uses_kafka && !matches!(cli.command, Command::Up { .. });
    if talks_to_a_running_engine && settings.kafka.brokers.trim().is_empty() {
        // No brokers configured: the embedded broker of a running `ese up`.
        settings.kafka.brokers = settings.broker.listen.clone();
        eprintln!(
            "ese: no kafka.brokers (KAFKA_BROKERS) set; using the embedded broker of `ese up` at {}",
            settings.kafka.brokers
        );
    }
    if uses_kafka && !settings.kafka.brokers.trim().is_empty() {
        // Refused credentials or an untrusted certificate end the command
        // here, with the broker's words, instead of being retried forever.
        crate::kafka::check_connection(&settings.kafka, std::time::Duration::from_secs(30)).await?;
    }
    match cli.command {
        Command::Migrate => engine::migrate(&settings).await,
        Command::Topics {
            command: TopicsCommand::Create,
        } => engine::create_topics(&settings).await,
        Command::Run { stages } => engine::run(&settings, &stages).await,
        Command::Up { with_provider_sim } => engine::up::up(settings, with_provider_sim).await,
        Command::Serve => engine::serve(&settings).await,
        Command::ProviderSim { listen } => engine::provider_sim(&settings, listen).await,
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
            crate::ops::replay_command(&settings, &stage, &target, dry_run, follow).await
        }
        Command::Status { watch, json } => crate::ops::status_command(&settings, watch, json).await,
        Command::Dlq {
            command: DlqCommand::List { stage, limit },
        } => crate::ops::dlq_list_command(&settings, &stage, limit).await,
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    stage,
                    filter,
                    dry_run,
                },
        } => crate::ops::dlq_replay_command(&settings, &stage, filter.as_deref(), dry_run).await,
        Command::Retention { dry_run, as_of } => {
            let stop = tokio_util::sync::CancellationToken::new();
            engine::cancel_on_signal(stop.clone());
            crate::ops::retention_command(&settings, dry_run, as_of, stop).await
        }
        Command::Schemas {
            command: SchemasCommand::Check,
        } => crate::ops::schemas::check_command(&settings).await,
        // Answered above, before the configuration is loaded.
        Command::Healthcheck { url, timeout } => {
            engine::healthcheck::healthcheck(&url, timeout).await
        }
        Command::Broker { listen, storage } => {
            let listen = listen.unwrap_or_else(|| settings.broker.listen.clone());
            let storage = match storage {
                Some(s) => s,
                None => settings.broker.storage_url()?,
            };
            engine::broker(&listen, &storage).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;

    #[test]
    fn every_command_and_argument_is_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
