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

mod simulator;
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
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated; `KAFKA_BROKERS` sets it. Empty means
    /// "start the embedded broker" under `ese up`. Default empty.
    pub brokers: String,
    /// Partitions of each topic `ese topics create` makes. Default 6.
    pub partitions: i32,
    /// Replication factor of created topics. Default 1.
    pub replication_factor: i32,
    /// `client.id` of every client. Default `ese`.
    pub client_id: String,
    /// Consumer group session timeout. Default 10s.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How long a produce may wait for the broker's acknowledgement. Default 30s.
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// How long the producer waits to fill a batch (`linger.ms`). Default 5ms.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// librdkafka statistics interval, the source of the lag gauges. Default 5s.
    #[serde(with = "humantime_serde")]
    pub statistics_interval: Duration,
    /// `min.insync.replicas` of created topics: with `acks=all`, how many
    /// replicas must have a record before it is acknowledged. Default 1; 2
    /// with three brokers at replication factor 3.
    pub min_insync_replicas: i32,
    /// How clients reach the brokers: `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or
    /// `SASL_SSL`. Default `PLAINTEXT`.
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism under `SASL_*`: `PLAIN`, `SCRAM-SHA-256` or
    /// `SCRAM-SHA-512`. The password comes only from `KAFKA_SASL_PASSWORD`.
    /// Default `PLAIN`.
    pub sasl_mechanism: SaslMechanism,
    /// SASL user name under `SASL_*`. Default empty.
    pub sasl_username: String,
    /// PEM file of the CA(s) that signed the brokers' certificates under
    /// `SSL`/`SASL_SSL`; empty trusts the system's CAs. Default empty.
    pub ssl_ca_file: String,
    /// Extra librdkafka properties passed through as they are.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// `kafka.security-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

/// `kafka.sasl-mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegistryConfig {
    /// Confluent-compatible schema registry URL (for Apicurio, its
    /// `/apis/ccompat/v7` path). Empty: Avro single-object encoding with the
    /// schemas in `schemas/`. Default empty.
    pub url: String,
    /// User for HTTP basic auth; empty: none. The password comes only from
    /// `SCHEMA_REGISTRY_PASSWORD`. Default empty.
    pub username: String,
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
pub struct BrokerConfig {
    /// Where the embedded broker listens; also where `ese status`, `replay`,
    /// `dlq`, `demo` and `run` look for it when no brokers are configured.
    /// Default `127.0.0.1:9092`.
    pub listen: String,
    /// Embedded broker storage. Empty (the default): durable, a SQLite file
    /// `broker.db` in `data-dir`, which survives kill -9 and restarts with
    /// every acknowledged record. `memory://NAME/` keeps nothing (for
    /// throwaway runs); `sqlite:///ABSOLUTE/PATH.db` another file.
    pub storage: String,
    /// The embedded broker's data folder, created on first run. Empty (the
    /// default): `$XDG_DATA_HOME/ese`, else `$HOME/.local/share/ese`.
    pub data_dir: String,
}

impl BrokerConfig {
    /// The data folder (see `data-dir`).
    pub fn data_dir(&self) -> std::path::PathBuf {
        if !self.data_dir.trim().is_empty() {
            return std::path::PathBuf::from(self.data_dir.trim());
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .map(|h| std::path::PathBuf::from(h).join(".local/share"))
            })
            .unwrap_or_else(|| std::path::PathBuf::from(".ese"));
        base.join("ese")
    }

    /// The storage URL the embedded broker runs on: `storage`, or the
    /// durable default in the data folder (created now).
    pub fn storage_url(&self) -> anyhow::Result<String> {
        if !self.storage.trim().is_empty() {
            return Ok(self.storage.trim().to_string());
        }
        let dir = self.data_dir();
        std::fs::create_dir_all(&dir).map_err(|e| {
            anyhow::anyhow!("broker.data-dir {}: cannot create it: {e}", dir.display())
        })?;
        let dir = std::path::absolute(&dir)
            .map_err(|e| anyhow::anyhow!("broker.data-dir {}: {e}", dir.display()))?;
        Ok(format!("sqlite://{}", dir.join("broker.db").display()))
    }
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

/// Consent keywords and auto-replies. A keyword matches the whole message
/// as people write it (width, case, quotes, emoji, zero-width characters,
/// hyphens ignored: `stages::consent::normalise`), or with only filler words
/// around it in a short message ("please stop", "stop texting me").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConsentConfig {
    /// Default the FCC's list (STOP, QUIT, END, REVOKE, OPT OUT, CANCEL,
    /// UNSUBSCRIBE) plus STOPALL, STOP ALL, OPTOUT.
    pub opt_out_keywords: Vec<String>,
    /// Default START, YES, UNSTOP.
    pub opt_in_keywords: Vec<String>,
    /// Default HELP, INFO.
    pub help_keywords: Vec<String>,
    /// Words that may surround a keyword in a plain request ("please",
    /// "me", "texting"…).
    #[serde(default)]
    pub filler_words: Vec<String>,
    /// A message of more words than this is never a plain request, even if
    /// all but the keyword are fillers. Default 6.
    #[serde(default = "default_max_plain_words")]
    pub max_plain_words: usize,
    /// Sent once after an opt-out (the one message an opted-out number gets); empty: none.
    pub opt_out_reply: String,
    /// Sent after an opt-in; empty: none.
    pub opt_in_reply: String,
    /// Sent after HELP to any number not opted out; empty: none.
    pub help_reply: String,
    /// Answer a message that mentions an opt-out keyword without plainly
    /// revoking ("can I cancel my order?", kept as `UNCLEAR`) with
    /// `clarify-reply`, at most once per number per `clarify-interval`, and
    /// never to an opted-out number. Default true.
    pub clarify: bool,
    /// Default "If you want no more messages from us, reply STOP."
    pub clarify_reply: String,
    /// Default 24h.
    #[serde(with = "humantime_serde")]
    pub clarify_interval: Duration,
    /// Operator rules: a keyword and its reply (numbers not opted out).
    #[serde(default)]
    pub rules: Vec<ReplyRule>,
    /// What a STOP stops: `all` (default: every channel; the person's
    /// overall `users.consent_state`) or `channel` (the channel it came on,
    /// which then keeps its own consent, `user_channels.consent_state`;
    /// START works the same way). Provider opt-outs (21610) follow it too.
    #[serde(default)]
    pub stop_scope: StopScope,
}

/// `consent.stop-scope`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopScope {
    #[default]
    All,
    Channel,
}

fn default_max_plain_words() -> usize {
    6
}

/// `[[consent.rules]] keyword = "HOURS" reply = "We are open 9-5."`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReplyRule {
    pub keyword: String,
    pub reply: String,
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
    fn defaults_load() {
        let s = Settings::load(None).unwrap();
        assert!(s.pipelines.contains_key("users"));
        assert!(s.all_topics().contains(&"dlq.users".to_string()));
    }
}
