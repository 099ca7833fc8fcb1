//! What passes between the runner and a stage: the records consumed, the
//! errors a stage returns, and the [`Collector`] its outputs go to.

use std::collections::BTreeMap;
use std::sync::Arc;

use rdkafka::message::{Headers, Message};

use super::RECEIVED_AT_HEADER;
use crate::codec::{Codec, CodecError};
use crate::db::{self, ErrorClass};
use crate::records::Record;

/// One consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct InRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Broker timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl InRecord {
    pub(super) fn from_message<M: Message>(m: &M) -> Self {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            timestamp_ms: m.timestamp().to_millis(),
            headers,
        }
    }

    /// The payload, or an empty slice for a tombstone.
    pub fn payload(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }

    /// A header's value by name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// `topic/partition@offset`, for messages and event ids.
    pub fn coordinates(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// A decoded record and the record it came from.
#[derive(Debug)]
pub struct Item<T> {
    pub record: InRecord,
    pub value: T,
}

/// What went wrong, and so what the runner does about it.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Worth retrying: the batch runs again after a backoff.
    #[error("{0}")]
    Transient(String),
    /// The data is at fault: the record goes to the DLQ (a failing batch is
    /// split so only the guilty records go).
    #[error("{0}")]
    Poison(String),
    /// A bug or broken setup: the stage stops.
    #[error("{0}")]
    Fatal(String),
}

impl From<tokio_postgres::Error> for StageError {
    fn from(e: tokio_postgres::Error) -> Self {
        let text = match e.as_db_error() {
            Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
            None => format!("postgres: {e}"),
        };
        match db::classify(&e) {
            ErrorClass::Transient => StageError::Transient(text),
            ErrorClass::Data => StageError::Poison(text),
            ErrorClass::Fatal => StageError::Fatal(text),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StageError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StageError::Transient(format!("postgres pool: {other}")),
        }
    }
}

impl From<CodecError> for StageError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Registry(text) => StageError::Transient(format!("schema registry: {text}")),
            e @ CodecError::RegistryRefused(_) => StageError::Fatal(e.to_string()),
            other => StageError::Poison(format!("undecodable record: {other}")),
        }
    }
}

/// An output record a stage wants produced with its batch.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Headers an output carries forward from the input it came from: the
/// runner's own tracing (when the bridge received the webhook).
const CARRIED: &[&str] = &[RECEIVED_AT_HEADER];

/// Where a stage puts its outputs and names its poison records; once the
/// batch has committed, what it still owes the broker.
pub struct Collector {
    codec: Codec,
    /// Output name → topic (the stage's `pipelines.<stage>.outputs`).
    outputs_of: Arc<BTreeMap<String, String>>,
    pub(super) outputs: Vec<OutRecord>,
    pub(super) dead: Vec<(usize, String)>,
}

impl Collector {
    /// A collector for outputs named by `outputs_of` (output → topic), as
    /// the runner makes one per batch; public for benchmarks that call a
    /// stage's `process` directly.
    pub fn new(codec: Codec, outputs_of: Arc<BTreeMap<String, String>>) -> Self {
        Self {
            codec,
            outputs_of,
            outputs: Vec::new(),
            dead: Vec::new(),
        }
    }

    /// Encodes `record` and produces it on the stage's output `output`
    /// keyed by `key`, carrying `from`'s tracing headers forward; acknowledged
    /// before the batch's offsets are stored.
    pub async fn emit<R: Record>(
        &mut self,
        from: &InRecord,
        output: &str,
        key: impl Into<Vec<u8>>,
        record: &R,
    ) -> Result<(), StageError> {
        let topic = self.topic(output)?;
        let payload = self.codec.encode(&topic, record).await?;
        let headers = from
            .headers
            .iter()
            .filter(|(k, _)| CARRIED.contains(&k.as_str()))
            .cloned()
            .collect();
        self.outputs.push(OutRecord {
            topic,
            key: key.into(),
            payload,
            headers,
        });
        Ok(())
    }

    /// The topic of output `output`, or a fatal error naming the missing key.
    pub fn topic(&self, output: &str) -> Result<String, StageError> {
        self.outputs_of.get(output).cloned().ok_or_else(|| {
            StageError::Fatal(format!(
                "the stage's pipeline has no output {output:?} (outputs: {})",
                self.outputs_of
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Marks the batch item at `index` as poison: it goes to the DLQ with `reason`.
    pub fn dead_letter(&mut self, index: usize, reason: impl Into<String>) {
        self.dead.push((index, reason.into()));
    }

    /// Takes over `other`'s outputs and dead letters, whose indexes count
    /// from `base` in this one's batch.
    pub(super) fn append(&mut self, other: Collector, base: usize) {
        self.outputs.extend(other.outputs);
        self.dead
            .extend(other.dead.into_iter().map(|(i, r)| (base + i, r)));
    }
}
