//! `ese dlq`: dead letters listed readably and put back on their source topic.

use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::FutureRecord;

use crate::codec::Codec;
use crate::config::Settings;
use crate::kafka::{Producer, TopicReader};
use crate::runner::dlq_headers;

/// A record on a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message: OwnedMessage,
}

impl From<OwnedMessage> for DeadLetter {
    fn from(message: OwnedMessage) -> Self {
        Self { message }
    }
}

impl DeadLetter {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        let headers = self.message.headers()?;
        headers
            .iter()
            .filter(|h| h.key == name)
            .last()
            .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
    }

    /// Why it was dead-lettered (`ese.error`).
    pub fn reason(&self) -> Option<String> {
        self.header(dlq_headers::ERROR)
    }

    /// Every header as text.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let v = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                        (h.key.to_string(), v.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The payload for people: the decoded record as JSON when a known schema
    /// reads it, else UTF-8 text, else hex.
    pub async fn readable_body(&self, codec: &Codec) -> String {
        let bytes = self.message.payload().unwrap_or_default();
        if let Some((kind, json)) = codec.describe(bytes).await {
            return format!("{kind} {json}");
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => text.to_string(),
            Err(_) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// Every dead letter of `stage`, oldest first per partition.
pub async fn dead_letters(settings: &Settings, stage: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let pipeline = settings.pipeline(stage)?;
    let reader = TopicReader::new(&settings.kafka)?;
    let from = reader.start_offsets(&pipeline.dlq).await?;
    Ok(reader
        .read_messages(&pipeline.dlq, &from)
        .await?
        .into_iter()
        .map(DeadLetter::from)
        .collect())
}

/// Puts `letters` back on their source topics (key, payload and the original
/// headers; the engine's `ese.*` headers dropped, `ese.replayed-from` added).
/// Safe to repeat: every stage's sink is idempotent.
pub async fn replay_dead_letters(
    settings: &Settings,
    stage: &str,
    letters: &[DeadLetter],
) -> anyhow::Result<usize> {
    let pipeline = settings.pipeline(stage)?;
    let producer = Producer::new(&settings.kafka)?;
    let mut owned = Vec::new();
    for d in letters {
        let topic = d.header(dlq_headers::SOURCE_TOPIC).ok_or_else(|| {
            anyhow::anyhow!(
                "{}[{}]@{} has no ese.source.topic header",
                pipeline.dlq,
                d.message.partition(),
                d.message.offset()
            )
        })?;
        let from = format!(
            "{}/{}@{}",
            pipeline.dlq,
            d.message.partition(),
            d.message.offset()
        );
        let mut headers: Vec<(String, Vec<u8>)> = d
            .message
            .headers()
            .map(|h| {
                h.iter()
                    .filter(|h| {
                        !h.key.starts_with(dlq_headers::PREFIX)
                            || h.key == crate::runner::RECEIVED_AT_HEADER
                    })
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        headers.push((dlq_headers::REPLAYED_FROM.into(), from.into_bytes()));
        owned.push((topic, d, headers));
    }
    let records = owned
        .iter()
        .map(|(topic, d, headers)| {
            let mut h = rdkafka::message::OwnedHeaders::new();
            for (k, v) in headers {
                h = h.insert(rdkafka::message::Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
            let mut rec = FutureRecord::<[u8], [u8]>::to(topic).headers(h);
            if let Some(k) = d.message.key() {
                rec = rec.key(k);
            }
            if let Some(p) = d.message.payload() {
                rec = rec.payload(p);
            }
            rec
        })
        .collect();
    producer
        .send_all(records, settings.kafka.produce_timeout)
        .await
        .map_err(|e| anyhow::anyhow!("putting dead letters back: {e}"))?;
    Ok(owned.len())
}

/// `ese dlq list`: a stage's dead letters (the newest `limit`), each with
/// its position, headers and a readable body.
pub async fn dlq_list_command(
    settings: &Settings,
    stage: &str,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let codec = Codec::new(&settings.schema_registry)?;
    let mut letters = dead_letters(settings, stage).await?;
    if let Some(n) = limit {
        letters.sort_by_key(|d| d.message.timestamp().to_millis());
        letters = letters.split_off(letters.len().saturating_sub(n));
    }
    for d in &letters {
        let m = &d.message;
        println!(
            "{}[{}]@{}",
            settings.pipeline(stage)?.dlq,
            m.partition(),
            m.offset()
        );
        for (k, v) in d.headers() {
            println!("  {k}: {v}");
        }
        println!("  body: {}", d.readable_body(&codec).await);
    }
    println!("{} dead letter(s)", letters.len());
    Ok(())
}

/// `ese dlq replay`: the dead letters whose reason contains `filter`
/// (case-insensitive) back on their source topics, or only listed with `dry_run`.
pub async fn dlq_replay_command(
    settings: &Settings,
    stage: &str,
    filter: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let filter = filter.map(str::to_lowercase);
    let all = dead_letters(settings, stage).await?;
    let chosen: Vec<DeadLetter> = all
        .iter()
        .filter(|d| match &filter {
            None => true,
            Some(f) => d.reason().unwrap_or_default().to_lowercase().contains(f),
        })
        .cloned()
        .collect();
    for d in &chosen {
        println!(
            "{} {}[{}]@{}: {}",
            if dry_run { "would replay" } else { "replaying" },
            d.header(dlq_headers::SOURCE_TOPIC).unwrap_or_default(),
            d.header(dlq_headers::SOURCE_PARTITION).unwrap_or_default(),
            d.header(dlq_headers::SOURCE_OFFSET).unwrap_or_default(),
            d.reason().unwrap_or_default()
        );
    }
    if !dry_run {
        let n = replay_dead_letters(settings, stage, &chosen).await?;
        println!("{n} dead letter(s) back on their source topics");
        mark_replayed(settings, stage, &all, &chosen).await?;
    }
    Ok(())
}

/// Commits, for the stage's DLQ replay group, each partition's first dead
/// letter not replayed (its end when all were): the unreplayed backlog
/// (`ese_dlq_unreplayed_records`) then counts only what is left.
async fn mark_replayed(
    settings: &Settings,
    stage: &str,
    all: &[DeadLetter],
    chosen: &[DeadLetter],
) -> anyhow::Result<()> {
    let pipeline = settings.pipeline(stage)?;
    let replayed: std::collections::HashSet<(i32, i64)> = chosen
        .iter()
        .map(|d| (d.message.partition(), d.message.offset()))
        .collect();
    let ends = TopicReader::new(&settings.kafka)?
        .end_offsets(&pipeline.dlq)
        .await?;
    let mut offsets = Vec::new();
    for (partition, end) in ends {
        let first_left = all
            .iter()
            .filter(|d| d.message.partition() == partition)
            .map(|d| d.message.offset())
            .filter(|o| !replayed.contains(&(partition, *o)))
            .min()
            .unwrap_or(end);
        offsets.push((pipeline.dlq.clone(), partition, first_left));
    }
    super::commit_offsets(settings, &super::dlq_replay_group(pipeline), &offsets).await
}
