//! Settings: one typed tree loaded with figment.
//!
//! Precedence, lowest first: `config/default.toml` (embedded) < `pipelines/*.toml`
//! (embedded) < the `--config FILE` < `DATABASE_URL` / `KAFKA_BROKERS` <
//! `ESE__SECTION__KEY` variables (`__` separates levels, `_` inside a name
//! stands for `-`) < programmatic overrides (tests). Unknown keys are errors
//! that name the key and where it came from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

mod consent;
mod kafka;
mod simulator;
pub use consent::{ConsentConfig, ReplyRule, StopScope};
pub use kafka::{BrokerConfig, KafkaConfig, RegistryConfig, SaslMechanism, SecurityProtocol};
pub use simulator::{ContentTemplate, FailureMix, MAX_LATENCY, SimConfig, is_content_sid};

const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

// `PIPELINES`: every `pipelines/<stage>.toml`, embedded by build.rs.
include!(concat!(env!("OUT_DIR"), "/pipelines.rs"));

/// The whole configuration of one `ese` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub schema_registry: RegistryConfig,
    pub metrics: MetricsConfig,
    pub phone: PhoneConfig,
    pub broker: BrokerConfig,
    pub engine: EngineConfig,
    pub bridge: BridgeConfig,
    pub admin: AdminConfig,
    pub consent: ConsentConfig,
    pub receipts: ReceiptsConfig,
    pub campaigns: CampaignsConfig,
    pub provider: ProviderConfig,
    pub sender: SenderConfig,
    pub retention: RetentionConfig,
    /// `ese provider-sim`: the Twilio-compatible simulator.
    pub provider_sim: SimConfig,
    /// Every topic, by the key pipelines and components name it with
    /// (`users = "users.upserts"`): topics are named here only.
    pub topics: BTreeMap<String, String>,
    /// Stage definitions keyed by stage name (`pipelines/<stage>.toml`);
    /// after loading, their topic keys are resolved to topic names.
    pub pipelines: BTreeMap<String, Pipeline>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL; `DATABASE_URL` sets it. Default `postgres://postgres@127.0.0.1:5432/postgres`.
    pub url: String,
    /// Connections in the pool shared by every stage of the process. Default 16.
    pub pool_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` (and `/healthz`) listen, for every process; the only
    /// place metrics are served. Default `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// How often the business gauges and DLQ depths are refreshed. Default 15s.
    #[serde(with = "humantime_serde")]
    pub business_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PhoneConfig {
    /// Region (ISO 3166 alpha-2) for numbers written without a country code. Default `US`.
    pub default_region: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EngineConfig {
    /// On SIGTERM/SIGINT, how long the stages may take to finish their
    /// batches and commit before the process gives up on them (and exits
    /// non-zero, naming them). Default 30s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BridgeConfig {
    /// Where the webhook bridge listens: the webhooks, `/healthz` and
    /// `/readyz`, nothing else. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// The base URL the provider calls, exactly as configured at the provider;
    /// signatures are computed over it plus path and query. Default `http://127.0.0.1:8080`.
    pub public_url: String,
    /// Largest accepted body; larger gets 413. Default 65536.
    pub max_body_bytes: usize,
    /// Requests handled at once; more get 503 with Retry-After. Default 1024.
    pub max_in_flight: usize,
    /// The bridge producer's `linger.ms`: each request waits for its own
    /// acknowledgement, so lingering costs latency. Default 1ms.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// How long a webhook waits for the broker's acknowledgement before 503. Default 10s.
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// How long a client may take to send its request head, and then its
    /// body; slower gets the connection closed (head) or 408 (body). A
    /// request takes an in-flight slot only once its body is in. Default 10s.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Open connections at once; more are closed as they arrive. Default 10000.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin API (`/api/v1`) listens, apart from the public
    /// webhook port. Default `127.0.0.1:8081`.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReceiptsConfig {
    /// A callback with no message for its SID after this long counts as unmatched. Default 10m.
    #[serde(with = "humantime_serde")]
    pub unmatched_after: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CampaignsConfig {
    /// Deepest nesting a segment filter may have. Default 8.
    pub max_filter_depth: usize,
    /// Recipients per fan-out page (one transaction and one burst of send records). Default 5000.
    pub fanout_page_size: i64,
    /// How often the scheduler looks for due campaigns and finished ones. Default 1s.
    #[serde(with = "humantime_serde")]
    pub scheduler_interval: Duration,
    /// How old a segment's `estimated_audience_size` may grow before the
    /// scheduler counts it again. Default 10m.
    #[serde(with = "humantime_serde")]
    pub estimate_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionConfig {
    /// `delivery_receipts` and `inbound_events` rows older than this are
    /// deleted. Default 7 years.
    #[serde(with = "humantime_serde")]
    pub audit: Duration,
    /// Rows per delete transaction. Default 10000.
    pub batch_size: i64,
    /// How often the scheduler deletes what expired. Default 1h.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Topics (by key) written from outside the pipeline: their retention is
    /// the replay window.
    pub raw_topics: Vec<String>,
    /// `retention.ms` of the raw topics. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub raw_topic_retention: Duration,
    /// `retention.ms` of the dead-letter topics (keys `dlq-…`). Default 90 days.
    #[serde(with = "humantime_serde")]
    pub dlq_topic_retention: Duration,
    /// `retention.ms` of every other topic. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub topic_retention: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProviderConfig {
    /// The provider's API base URL. Default `https://api.twilio.com`; point it
    /// at `ese provider-sim` locally.
    pub base_url: String,
    /// Sender number (E.164) used as `From`; or set `messaging-service-sid`.
    pub from: String,
    /// `MessagingServiceSid` used instead of `From` when set.
    pub messaging_service_sid: String,
    /// A provider call that takes longer is treated as an unknown outcome
    /// (the message is reconciled, not re-sent). Default 10s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Provider calls in flight per sender process. Default 64.
    pub concurrency: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SenderConfig {
    /// SMS messages per second per sender number across all sender
    /// processes; 0 = the default of `sms-number-kind`. Default 0.
    pub global_rate_limit: u32,
    /// What kind of SMS number the sender is, for its carrier's default
    /// rate when `global-rate-limit` is 0: `long-code` (1/s), `toll-free`
    /// (3/s), `short-code` (100/s); empty: no limit. Default empty.
    pub sms_number_kind: String,
    /// WhatsApp messages per second per sender across all sender processes
    /// (the provider's default, 80); 0 = off. Default 80.
    pub whatsapp_rate_limit: u32,
    /// Sends the limiters may let through at once above the steady rate,
    /// split across sender processes like the rate; absorbs timer lateness so
    /// the mean rate holds. Default 20.
    pub burst: u32,
    /// Delay before retry 1, 2, 3…; each has its retry topic (`pipelines.sender.outputs.retry-N`).
    pub retry_delays: Vec<humantime_serde::Serde<Duration>>,
    /// Transient failures retried before the message is FAILED. Default 3.
    pub max_retries: u32,
    /// Time zone for quiet hours when neither the user's `timezone` attribute
    /// nor the number's region gives one. Default `UTC`.
    pub default_timezone: String,
    /// A message left SENDING this long (a sender died mid-call) is looked up
    /// at the provider. Default 2m.
    #[serde(with = "humantime_serde")]
    pub reconcile_after: Duration,
    /// How often held messages that are due go back on the send topic. Default 1s.
    #[serde(with = "humantime_serde")]
    pub pump_interval: Duration,
    /// How long after a person's last WhatsApp message free-form WhatsApp
    /// messages (replies, confirmations) may go: WhatsApp's
    /// customer-service window. Default 24h.
    #[serde(with = "humantime_serde")]
    pub whatsapp_window: Duration,
    /// An approved template (its ContentSid) that carries a free-form
    /// WhatsApp message outside the window, `{{1}}` the message's text;
    /// empty: such a message is FAILED with the reason, without a call.
    /// Default empty.
    pub whatsapp_fallback_content_sid: String,
}

impl SenderConfig {
    /// SMS messages per second per sender number (0: none): the configured
    /// limit, else the number kind's carrier default.
    pub fn sms_rate_limit(&self) -> anyhow::Result<u32> {
        if self.global_rate_limit > 0 {
            return Ok(self.global_rate_limit);
        }
        match self.sms_number_kind.as_str() {
            "" => Ok(0),
            "long-code" => Ok(1),
            "toll-free" => Ok(3),
            "short-code" => Ok(100),
            other => anyhow::bail!(
                "sender.sms-number-kind: {other:?} is not long-code, toll-free, short-code or empty"
            ),
        }
    }
}

/// One stage's wiring and tuning (`pipelines/<stage>.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Pipeline {
    /// Consumer group id; replay resets this group.
    pub group_id: String,
    /// Topics consumed, by `[topics]` key (their names once loaded).
    pub inputs: Vec<String>,
    /// The stage's outputs: output name → `[topics]` key (topic name once loaded).
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Dead-letter topic for poison records, by `[topics]` key (name once loaded).
    pub dlq: String,
    /// Records per batch (one Postgres transaction each). Default 500.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a batch waits to fill before it runs anyway. Default 50ms.
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Workers; each owns a fixed share of partitions, so per-partition order holds. Default 1.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Backoff for transient errors (the batch is retried, its offsets not stored).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Extra librdkafka properties of this stage's consumer (e.g. `max.poll.interval.ms`).
    #[serde(default)]
    pub consumer_options: BTreeMap<String, String>,
}

/// Capped exponential backoff for transient errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetryPolicy {
    /// First wait. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest wait. Default 10s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Attempts before the stage stops as fatal; 0 retries for ever. Default 0.
    #[serde(default)]
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_attempts: 0,
        }
    }
}

fn default_batch_size() -> usize {
    500
}
fn default_max_wait() -> Duration {
    Duration::from_millis(50)
}
fn default_concurrency() -> usize {
    1
}

/// The real provider's API, `provider.base-url`'s default.
pub const TWILIO_API: &str = "https://api.twilio.com";

/// `ESE__BRIDGE__PUBLIC_URL` (prefix stripped, lower-cased: `bridge__public_url`) → `bridge.public-url`.
pub fn env_key(key: &str) -> String {
    key.split("__")
        .map(|part| part.replace('_', "-"))
        .collect::<Vec<_>>()
        .join(".")
}

impl Settings {
    /// Loads settings from every source, optional file included.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_with(file, Serialized::defaults(serde_json::json!({})))
    }

    /// Like [`Settings::load`], with `overrides` (a serializable tree) on top of everything.
    pub fn load_with(
        file: Option<&Path>,
        overrides: impl figment::Provider,
    ) -> anyhow::Result<Self> {
        let mut figment = Figment::new().merge(Toml::string(DEFAULT_TOML));
        for (_, text) in PIPELINES {
            figment = figment.merge(Toml::string(text));
        }
        if let Some(path) = file {
            if !path.exists() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(
                Env::raw()
                    .only(&["KAFKA_BROKERS"])
                    .map(|_| "kafka.brokers".into()),
            )
            .merge(Env::prefixed("ESE__").map(|key| env_key(key.as_str()).into()))
            .merge(overrides);
        let mut settings: Settings = figment.extract().map_err(|e| {
            let errors: Vec<String> = e.into_iter().map(|e| describe(&e)).collect();
            anyhow::anyhow!("invalid configuration: {}", errors.join("; "))
        })?;
        settings.resolve_topics()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (name, p) in &self.pipelines {
            if p.inputs.is_empty() {
                anyhow::bail!("pipelines.{name}.inputs: a stage needs at least one input topic");
            }
            if p.batch_size == 0 || p.concurrency == 0 {
                anyhow::bail!("pipelines.{name}: batch-size and concurrency must be at least 1");
            }
        }
        if self.sender.reconcile_after <= self.provider.timeout + Duration::from_secs(1) {
            // A call still waiting for its answer would be looked up and sent again.
            anyhow::bail!(
                "sender.reconcile-after ({:?}) must exceed provider.timeout ({:?}) by at least 1s",
                self.sender.reconcile_after,
                self.provider.timeout
            );
        }
        if self.kafka.security_protocol.uses_sasl() && self.kafka.sasl_username.trim().is_empty() {
            anyhow::bail!(
                "kafka.sasl-username is empty but kafka.security-protocol is {:?}: set the user (the password comes from KAFKA_SASL_PASSWORD)",
                self.kafka.security_protocol.as_str().to_ascii_uppercase()
            );
        }
        if !self.kafka.ssl_ca_file.is_empty() && !Path::new(&self.kafka.ssl_ca_file).is_file() {
            anyhow::bail!(
                "kafka.ssl-ca-file: {} is not a readable file",
                self.kafka.ssl_ca_file
            );
        }
        for key in &self.retention.raw_topics {
            if !self.topics.contains_key(key) {
                anyhow::bail!(
                    "retention.raw-topics: {key:?} is not a key of [topics] (keys: {})",
                    self.topics.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
        if self.retention.batch_size < 1 {
            anyhow::bail!(
                "retention.batch-size: {} must be at least 1",
                self.retention.batch_size
            );
        }
        self.sender.sms_rate_limit()?;
        let fallback = &self.sender.whatsapp_fallback_content_sid;
        if !fallback.is_empty() && !is_content_sid(fallback) {
            anyhow::bail!(
                "sender.whatsapp-fallback-content-sid: {fallback:?} is not a ContentSid (HX and 32 hex digits)"
            );
        }
        if phone_region(&self.phone.default_region).is_none() {
            anyhow::bail!(
                "phone.default-region: {:?} is not an ISO 3166 region code",
                self.phone.default_region
            );
        }
        Ok(())
    }

    /// Replaces every pipeline's topic keys with the topic names of
    /// `[topics]`. A name already (settings written back out) stays.
    fn resolve_topics(&mut self) -> anyhow::Result<()> {
        let topics = &self.topics;
        let name = |stage: &str, field: &str, key: &str| -> anyhow::Result<String> {
            if topics.values().any(|n| n == key) && !topics.contains_key(key) {
                return Ok(key.to_string());
            }
            topics.get(key).cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "pipelines.{stage}.{field}: {key:?} is not a key of [topics] (keys: {})",
                    topics.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })
        };
        for (stage, p) in &mut self.pipelines {
            for input in &mut p.inputs {
                *input = name(stage, "inputs", input)?;
            }
            for (out, key) in &mut p.outputs {
                *key = name(stage, &format!("outputs.{out}"), key)?;
            }
            p.dlq = name(stage, "dlq", &p.dlq)?;
        }
        Ok(())
    }

    /// The name of the topic `key` of `[topics]`.
    pub fn topic(&self, key: &str) -> anyhow::Result<&str> {
        self.topics
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("topics.{key} is not set"))
    }

    /// The pipeline of `stage`, or an error naming it.
    pub fn pipeline(&self, stage: &str) -> anyhow::Result<&Pipeline> {
        self.pipelines
            .get(stage)
            .ok_or_else(|| anyhow::anyhow!("no pipeline configured for stage {stage:?}"))
    }

    /// The topic campaign transitions go to.
    pub fn commands_topic(&self) -> anyhow::Result<String> {
        Ok(self.topic("campaign-commands")?.to_string())
    }

    /// Every topic with the retention `[retention]` gives it: the raw
    /// topics the replay window, dead letters (keys `dlq-…`) theirs, the
    /// rest the default.
    pub fn topic_retention(&self) -> BTreeMap<String, Duration> {
        let r = &self.retention;
        self.topics
            .iter()
            .map(|(key, name)| {
                let keep = if r.raw_topics.contains(key) {
                    r.raw_topic_retention
                } else if key.starts_with("dlq-") {
                    r.dlq_topic_retention
                } else {
                    r.topic_retention
                };
                (name.clone(), keep)
            })
            .collect()
    }

    /// Every topic of `[topics]`, sorted.
    pub fn all_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.topics.values().cloned().collect();
        topics.sort();
        topics.dedup();
        topics
    }
}

/// One figment error as "key: what is wrong (in SOURCE)".
fn describe(e: &figment::Error) -> String {
    let key = if e.path.is_empty() {
        "(top level)".to_string()
    } else {
        e.path.join(".")
    };
    let source = e
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(src) => format!(" in {src}"),
            None => format!(" in {}", m.name),
        })
        .unwrap_or_default();
    format!("{key}: {}{source}", e.kind)
}

/// The libphonenumber region of an ISO 3166 alpha-2 code (any case) it has
/// metadata for; `None` for anything else (`"XX"`, `"001"`, `"USA"`).
pub fn phone_region(code: &str) -> Option<rlibphonenumber::Region> {
    use rlibphonenumber::{PHONE_NUMBER_UTIL, Region};
    let region = Region::from_code(&code.to_ascii_uppercase()).ok()?;
    // Every pair of letters is a `Region`; only those with metadata have a
    // country calling code.
    PHONE_NUMBER_UTIL
        .get_country_code_for_region(region)
        .map(|_| region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_map_to_kebab_sections() {
        assert_eq!(env_key("BRIDGE__PUBLIC_URL"), "BRIDGE.PUBLIC-URL");
        assert_eq!(
            env_key("pipelines__users__batch_size"),
            "pipelines.users.batch-size"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Settings::load_with(
            None,
            Serialized::defaults(serde_json::json!({"database": {"nope": 1}})),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn the_default_broker_storage_is_a_journal_unless_the_folder_has_sqlite() {
        let dir = std::env::temp_dir().join(format!("ese-data-{}", uuid::Uuid::now_v7()));
        let mut broker = Settings::load(None).unwrap().broker;
        broker.data_dir = dir.display().to_string();
        let url = broker.storage_url().unwrap();
        assert_eq!(url, format!("file://{}/", dir.display()));
        // A folder an older ese left its SQLite file in stays on it.
        std::fs::write(dir.join("broker.db"), b"").unwrap();
        let url = broker.storage_url().unwrap();
        assert_eq!(url, format!("sqlite://{}", dir.join("broker.db").display()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn defaults_load() {
        let s = Settings::load(None).unwrap();
        assert!(s.pipelines.contains_key("users"));
        assert!(s.all_topics().contains(&"dlq.users".to_string()));
    }
}
