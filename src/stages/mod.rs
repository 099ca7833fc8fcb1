//! The stages, registered by name. Each is a [`crate::runner::Stage`]; the
//! runner does the rest.

pub mod consent;
pub mod fanout;
pub mod normalize;
pub mod receipts;
pub mod sender;
pub mod users;

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::config::Settings;
use crate::phone::Normalizer;
use crate::runner;

/// Every stage `ese run` knows, in pipeline order. `scheduler` is not a
/// consumer but runs the same way.
pub const ALL: &[&str] = &[
    "users",
    "normalize",
    "consent",
    "receipts",
    "fanout",
    "sender",
    "scheduler",
];

/// What a stage is built from.
#[derive(Clone)]
pub struct Deps {
    pub settings: Settings,
    pub pool: Pool,
    pub producer: crate::kafka::Producer,
    pub codec: Codec,
}

/// Runs stage `name` until `shutdown` (clean) or a fatal error.
pub async fn run(name: &str, deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    if name == "scheduler" {
        let commands = deps.commands()?;
        let interval = deps.settings.campaigns.scheduler_interval;
        crate::campaigns::scheduler::run(deps.pool, commands, interval, shutdown).await;
        return Ok(());
    }
    let pipeline = deps.settings.pipeline(name)?.clone();
    let phones = Normalizer::new(&deps.settings.phone.default_region);
    match name {
        "users" => {
            let stage = users::Users {
                codec: deps.codec.clone(),
                phones,
            };
            go(stage, pipeline, deps, shutdown).await
        }
        "normalize" => {
            let stage = normalize::Normalize {
                codec: deps.codec.clone(),
                phones,
                receipts_topic: output(&pipeline, name, "receipts")?,
                inbound_topic: output(&pipeline, name, "inbound")?,
            };
            go(stage, pipeline, deps, shutdown).await
        }
        "consent" => {
            let stage = consent::Consent {
                codec: deps.codec.clone(),
                cfg: deps.settings.consent.clone(),
                sends_topic: output(&pipeline, name, "sends")?,
                changes_topic: output(&pipeline, name, "changes")?,
            };
            go(stage, pipeline, deps, shutdown).await
        }
        "receipts" => {
            let stage = receipts::Receipts {
                codec: deps.codec.clone(),
                unmatched_after: deps.settings.receipts.unmatched_after,
                last_gauge: Default::default(),
            };
            go(stage, pipeline, deps, shutdown).await
        }
        "fanout" => {
            let wake = Arc::new(tokio::sync::Notify::new());
            let driver = fanout::Driver {
                pool: deps.pool.clone(),
                producer: deps.producer.clone(),
                codec: deps.codec.clone(),
                reader: crate::kafka::TopicReader::new(&deps.settings.kafka)?,
                sends_topic: output(&pipeline, name, "sends")?,
                page_size: deps.settings.campaigns.fanout_page_size,
                max_depth: deps.settings.campaigns.max_filter_depth,
                produce_timeout: deps.settings.kafka.produce_timeout,
                poll: deps.settings.campaigns.scheduler_interval,
                wake: wake.clone(),
            };
            let stop = shutdown.child_token();
            let driving = tokio::spawn(driver.run(stop.clone()));
            let stage = fanout::Fanout {
                codec: deps.codec.clone(),
                wake,
            };
            let result = go(stage, pipeline, deps, shutdown).await;
            stop.cancel();
            let _ = driving.await;
            result
        }
        "sender" => {
            let settings = &deps.settings;
            let sends_topic = pipeline
                .inputs
                .first()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("pipelines.sender.inputs is empty"))?;
            let retry_topics = (1..=settings.sender.retry_delays.len())
                .map(|n| output(&pipeline, name, &format!("retry-{n}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let provider = sender::Provider {
                http: crate::http::client_builder()
                    .build()
                    .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?,
                cfg: settings.provider.clone(),
                creds: sender::Credentials::from_env()?,
                status_callback: format!(
                    "{}/webhooks/twilio/status",
                    settings.bridge.public_url.trim_end_matches('/')
                ),
            };
            let default_tz = settings.sender.default_timezone.parse().map_err(|_| {
                anyhow::anyhow!(
                    "sender.default-timezone: {:?} is not an IANA time zone",
                    settings.sender.default_timezone
                )
            })?;
            let partitions = crate::kafka::TopicReader::new(&settings.kafka)?
                .end_offsets(&sends_topic)
                .await?
                .len();
            let pump = sender::Pump {
                pool: deps.pool.clone(),
                producer: deps.producer.clone(),
                codec: deps.codec.clone(),
                provider: provider.clone(),
                sends_topic: sends_topic.clone(),
                interval: settings.sender.pump_interval,
                reconcile_after: settings.sender.reconcile_after,
                produce_timeout: settings.kafka.produce_timeout,
            };
            let stage = sender::Sender {
                codec: deps.codec.clone(),
                pool: deps.pool.clone(),
                provider,
                cfg: settings.sender.clone(),
                retry_topics,
                phones,
                default_tz,
                limits: sender::Limits::new(&sends_topic, partitions, &settings.sender),
            };
            let stop = shutdown.child_token();
            let pumping = tokio::spawn(pump.run(stop.clone()));
            let result = go(stage, pipeline, deps, shutdown).await;
            stop.cancel();
            let _ = pumping.await;
            result
        }
        other => anyhow::bail!("unknown stage {other:?}; stages: {}", ALL.join(", ")),
    }
}

impl Deps {
    /// The publisher of campaign commands (admin API, scheduler).
    pub fn commands(&self) -> anyhow::Result<crate::campaigns::Commands> {
        Ok(crate::campaigns::Commands {
            producer: self.producer.clone(),
            codec: self.codec.clone(),
            topic: self.settings.commands_topic()?,
            timeout: self.settings.kafka.produce_timeout,
        })
    }
}

/// Produces `sends` on `topic`, keyed by recipient, and waits for every
/// acknowledgement (fan-out pages, held messages put back).
pub async fn produce_sends(
    producer: &crate::kafka::Producer,
    codec: &Codec,
    topic: &str,
    sends: &[crate::records::SendRequest],
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut payloads = Vec::with_capacity(sends.len());
    for s in sends {
        payloads.push(codec.encode(topic, s).await?);
    }
    let records = sends
        .iter()
        .zip(&payloads)
        .map(|(s, p)| {
            rdkafka::producer::FutureRecord::<[u8], [u8]>::to(topic)
                .key(s.recipient.as_bytes())
                .payload(p.as_slice())
        })
        .collect();
    producer
        .send_all(records, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("producing {} send records on {topic}: {e}", sends.len()))
}

/// The topic of output `key` of `stage`'s pipeline, or an error naming both.
fn output(pipeline: &crate::config::Pipeline, stage: &str, key: &str) -> anyhow::Result<String> {
    pipeline
        .outputs
        .get(key)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("pipelines.{stage}.outputs.{key} is not set"))
}

async fn go<S: runner::Stage>(
    stage: S,
    pipeline: crate::config::Pipeline,
    deps: Deps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    runner::run(
        Arc::new(stage),
        pipeline,
        &deps.settings.kafka,
        deps.pool,
        deps.producer,
        shutdown,
    )
    .await
}
