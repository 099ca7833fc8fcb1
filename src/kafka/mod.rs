//! Shared Kafka settings: one place that builds every producer, consumer and
//! admin client, so all of them talk to the same brokers the same way.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;

use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

/// The base client config: brokers, client id and pass-through options.
pub fn client_config(cfg: &KafkaConfig) -> anyhow::Result<ClientConfig> {
    if cfg.brokers.trim().is_empty() {
        anyhow::bail!(
            "kafka.brokers is empty: set KAFKA_BROKERS, or run `ese up` / `ese broker` for the embedded broker"
        );
    }
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.trim())
        .set("client.id", &cfg.client_id)
        .set("log_level", "3")
        .set("security.protocol", cfg.security_protocol.as_str());
    if cfg.security_protocol.uses_sasl() {
        let password = std::env::var(SASL_PASSWORD_ENV).map_err(|_| {
            anyhow::anyhow!(
                "kafka.security-protocol is {} but {SASL_PASSWORD_ENV} is not set (the SASL password is read from the environment only)",
                cfg.security_protocol.as_str().to_ascii_uppercase()
            )
        })?;
        c.set("sasl.mechanism", cfg.sasl_mechanism.as_str())
            .set("sasl.username", &cfg.sasl_username)
            .set("sasl.password", password);
    }
    if cfg.security_protocol.uses_tls() && !cfg.ssl_ca_file.is_empty() {
        c.set("ssl.ca.location", &cfg.ssl_ca_file);
    }
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    Ok(c)
}

/// Where the SASL password comes from: the environment only, never a file,
/// a flag or a log line.
pub const SASL_PASSWORD_ENV: &str = "KAFKA_SASL_PASSWORD";

/// Records the first error librdkafka reports that retrying will not cure
/// (credentials refused, a certificate not trusted, …), with the broker it
/// names.
#[derive(Default)]
struct FirstError(std::sync::Mutex<Option<String>>);

impl ClientContext for FirstError {
    fn error(&self, error: KafkaError, reason: &str) {
        let lasting = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
                    | RDKafkaErrorCode::InvalidArgument
                    | RDKafkaErrorCode::UnsupportedSASLMechanism
                    | RDKafkaErrorCode::IllegalSASLState
            )
        ) || reason.contains("SSL handshake failed")
            || reason.contains("SASL authentication error");
        if lasting {
            let mut first = self.0.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| reason.to_string());
        }
    }

    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, _: &str) {}
}

impl rdkafka::consumer::ConsumerContext for FirstError {}

/// Connects to the brokers once, before a command relies on them, and fails
/// with the broker's own words when that cannot work: credentials refused,
/// a certificate not trusted, nothing answering. Without this a client
/// retries such errors quietly forever.
pub async fn check_connection(cfg: &KafkaConfig, within: Duration) -> anyhow::Result<()> {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer<FirstError> = client_config(cfg)?
        .create_with_context(FirstError::default())
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka client: {e}"))?;
    let brokers = cfg.brokers.trim().to_string();
    let protocol = cfg.security_protocol.as_str().to_ascii_uppercase();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + within;
        loop {
            // Serves the client's error events into FirstError.
            let _ = consumer.poll(Duration::from_millis(100));
            if let Some(reason) = consumer
                .context()
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                anyhow::bail!("cannot connect to Kafka at {brokers} ({protocol}): {reason}");
            }
            match consumer.fetch_metadata(None, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => {
                    anyhow::bail!(
                        "cannot connect to Kafka at {brokers} ({protocol}) within {within:?}: {e}"
                    )
                }
                Err(_) => {}
            }
        }
    })
    .await?
}

mod producer;
mod reader;
mod topics;

pub use producer::{Producer, ProducerContext};
pub use reader::{PartitionOffsets, TopicReader};
pub use topics::{ConfigChange, TopicsReport, ensure_topics};

/// Config for a stage consumer in `group`: offsets stored by the runner only,
/// committed automatically.
pub fn consumer_config(cfg: &KafkaConfig, group: &str) -> anyhow::Result<ClientConfig> {
    let mut c = client_config(cfg)?;
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            cfg.session_timeout.as_millis().to_string(),
        )
        .set(
            "statistics.interval.ms",
            cfg.statistics_interval.as_millis().to_string(),
        );
    Ok(c)
}

/// True when a produce/consume error is worth retrying (the broker may come back).
pub fn is_transient(e: &KafkaError) -> bool {
    !matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
            | Some(RDKafkaErrorCode::InvalidMessage)
            | Some(RDKafkaErrorCode::UnknownTopicOrPartition)
            | Some(RDKafkaErrorCode::TopicAuthorizationFailed)
    )
}

/// The partition ids of `topic`, from `consumer`'s metadata (blocking).
pub fn partitions<X: rdkafka::consumer::ConsumerContext>(
    consumer: &impl rdkafka::consumer::Consumer<X>,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<i32>> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        anyhow::bail!("topic {topic} has no partitions (does it exist?)");
    }
    Ok(partitions)
}
