//! `[kafka]`, `[schema-registry]` and `[broker]`: reaching Kafka, secured or
//! not, the schema registry, and the embedded broker of `ese up`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

// The journal of `file://` storage in its folder (vendor/tansu-storage).
use tansu_storage::JOURNAL_FILE as JOURNAL;

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
pub struct BrokerConfig {
    /// Where the embedded broker listens; also where `ese status`, `replay`,
    /// `dlq`, `demo` and `run` look for it when no brokers are configured.
    /// Default `127.0.0.1:9092`.
    pub listen: String,
    /// Embedded broker storage. Empty (the default): durable, a journal
    /// file `broker.journal` in `data-dir` (`file://DATA-DIR`): records are
    /// served from memory and every write is in the journal before it is
    /// acknowledged, so kill -9 and restarts keep every acknowledged record.
    /// A data folder that already holds `broker.db` (from an ese before the
    /// journal) stays on it. `memory://NAME/` keeps nothing (for throwaway
    /// runs); `file:///ABSOLUTE/DIR` another folder; `sqlite:///ABSOLUTE/PATH.db`
    /// SQLite (slower, records not held in memory).
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
        let sqlite = dir.join("broker.db");
        if sqlite.exists() && !dir.join(JOURNAL).exists() {
            return Ok(format!("sqlite://{}", sqlite.display()));
        }
        let url = url::Url::from_directory_path(&dir).map_err(|()| {
            anyhow::anyhow!("broker.data-dir {}: not a usable path", dir.display())
        })?;
        Ok(url.to_string())
    }
}
