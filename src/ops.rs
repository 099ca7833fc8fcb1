//! Operating the pipelines from the command line: where each stage's consumer
//! group stands (`ese status`), moving a group's offsets to process records
//! again (`ese replay`), and dead letters (`ese dlq`).
//!
//! Everything here talks to the broker through rdkafka (metadata, group
//! descriptions, committed offsets, Fetch), so it works the same on the
//! embedded broker and on Apache Kafka.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::FutureRecord;
use serde::Serialize;

use crate::codec::Codec;
use crate::config::{Pipeline, Settings};
use crate::kafka::{PartitionOffsets, Producer, TopicReader, client_config};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer group as the group coordinator describes it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Group {
    /// `Stable`, `Empty`, `PreparingRebalance`, … (`Dead` when unknown).
    pub state: String,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub host: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {} ({})", self.client_id, self.host, self.id)
    }
}

/// Describes consumer group `group`.
pub async fn describe_group(settings: &Settings, group: &str) -> anyhow::Result<Group> {
    let consumer: BaseConsumer = client_config(&settings.kafka)?
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka client: {e}"))?;
    let group = group.to_string();
    tokio::task::spawn_blocking(move || {
        let list = consumer
            .fetch_group_list(Some(&group), TIMEOUT)
            .map_err(|e| anyhow::anyhow!("describing consumer group {group}: {e}"))?;
        Ok(match list.groups().iter().find(|g| g.name() == group) {
            None => Group {
                state: "Dead".into(),
                members: Vec::new(),
            },
            Some(g) => Group {
                state: g.state().to_string(),
                members: g
                    .members()
                    .iter()
                    .map(|m| Member {
                        id: m.id().to_string(),
                        client_id: m.client_id().to_string(),
                        host: m.client_host().to_string(),
                    })
                    .collect(),
            },
        })
    })
    .await?
}

/// Where `replay` moves a group.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Every partition's log start.
    Earliest,
    /// Explicit offsets: (topic, or None for the stage's only input; partition; offset).
    Offsets(Vec<(Option<String>, i32, i64)>),
    /// The first record at or after this time (ms since the epoch); the end
    /// where every record is older.
    Time(i64),
}

impl Target {
    /// Parses `--to-offset` values: `[TOPIC/]PARTITION:OFFSET[,…]`.
    pub fn parse_offsets(text: &str) -> anyhow::Result<Target> {
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (topic, rest) = match part.rsplit_once('/') {
                Some((t, r)) => (Some(t.to_string()), r),
                None => (None, part),
            };
            let bad = || {
                anyhow::anyhow!(
                    "--to-offset {part:?}: expected [TOPIC/]PARTITION:OFFSET, e.g. 0:1200"
                )
            };
            let (p, o) = rest.split_once(':').ok_or_else(bad)?;
            let p: i32 = p.trim().parse().map_err(|_| bad())?;
            let o: i64 = o.trim().parse().map_err(|_| bad())?;
            if p < 0 || o < 0 {
                return Err(bad());
            }
            out.push((topic, p, o));
        }
        if out.is_empty() {
            anyhow::bail!("--to-offset: no PARTITION:OFFSET given");
        }
        Ok(Target::Offsets(out))
    }

    /// Parses `--to-time` (RFC 3339).
    pub fn parse_time(text: &str) -> anyhow::Result<Target> {
        let t = chrono::DateTime::parse_from_rfc3339(text.trim()).map_err(|e| {
            anyhow::anyhow!(
                "--to-time {text:?}: not an RFC 3339 time ({e}); e.g. 2026-11-26T09:00:00Z"
            )
        })?;
        Ok(Target::Time(t.timestamp_millis()))
    }
}

/// One partition's line of a replay plan.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlanRow {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (None: nothing committed yet).
    pub committed: Option<i64>,
    /// The offset the group will resume from.
    pub new: i64,
    pub end: i64,
    /// Records that will be processed again (negative: skipped).
    pub again: i64,
}

/// What `ese replay` will do to a stage's consumer group.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub stage: String,
    pub group: String,
    pub rows: Vec<PlanRow>,
}

impl Plan {
    /// Records processed again in total.
    pub fn again(&self) -> i64 {
        self.rows.iter().map(|r| r.again.max(0)).sum()
    }

    /// The plan as a table for people.
    pub fn render(&self) -> String {
        let mut out = format!(
            "replay plan for stage {} (consumer group {}):\n{:<32} {:>9} {:>12} {:>12} {:>12} {:>10}\n",
            self.stage, self.group, "topic", "partition", "committed", "new", "end", "again"
        );
        for r in &self.rows {
            let committed = r
                .committed
                .map_or_else(|| "-".to_string(), |c| c.to_string());
            out.push_str(&format!(
                "{:<32} {:>9} {:>12} {:>12} {:>12} {:>10}\n",
                r.topic, r.partition, committed, r.new, r.end, r.again
            ));
        }
        out.push_str(&format!(
            "{} records will be processed again\n",
            self.again()
        ));
        out
    }
}

/// Works out where `target` puts `stage`'s group on each input partition.
pub async fn replay_plan(
    settings: &Settings,
    stage: &str,
    target: &Target,
) -> anyhow::Result<Plan> {
    let pipeline = settings.pipeline(stage)?;
    let reader = TopicReader::new(&settings.kafka)?;
    if let Target::Offsets(given) = target {
        for (topic, p, _) in given {
            match topic {
                Some(t) if !pipeline.inputs.contains(t) => anyhow::bail!(
                    "--to-offset: {t} is not an input of stage {stage} (inputs: {})",
                    pipeline.inputs.join(", ")
                ),
                None if pipeline.inputs.len() > 1 => anyhow::bail!(
                    "--to-offset {p}:…: stage {stage} reads {} topics ({}); write TOPIC/PARTITION:OFFSET",
                    pipeline.inputs.len(),
                    pipeline.inputs.join(", ")
                ),
                _ => {}
            }
        }
    }
    let mut rows = Vec::new();
    for topic in &pipeline.inputs {
        let offsets = reader.group_offsets(&pipeline.group_id, topic).await?;
        let starts: BTreeMap<i32, i64> = reader.start_offsets(topic).await?.into_iter().collect();
        let new: BTreeMap<i32, i64> = match target {
            Target::Earliest => starts.clone(),
            Target::Time(ms) => reader
                .offsets_for_time(topic, *ms)
                .await?
                .into_iter()
                .map(|(p, o)| {
                    let end = offsets
                        .iter()
                        .find(|x| x.partition == p)
                        .map_or(0, |x| x.end);
                    (p, o.unwrap_or(end))
                })
                .collect(),
            Target::Offsets(given) => {
                let mut m = BTreeMap::new();
                for (t, p, o) in given {
                    if t.as_ref().is_none_or(|t| t == topic) {
                        let Some(part) = offsets.iter().find(|x| x.partition == *p) else {
                            anyhow::bail!("--to-offset: {topic} has no partition {p}");
                        };
                        let start = starts.get(p).copied().unwrap_or(0);
                        if *o < start || *o > part.end {
                            anyhow::bail!(
                                "--to-offset {p}:{o}: {topic}[{p}] holds offsets {start}..{} (the end is {})",
                                part.end.max(start + 1) - 1,
                                part.end
                            );
                        }
                        m.insert(*p, *o);
                    }
                }
                m
            }
        };
        for PartitionOffsets {
            partition,
            committed,
            end,
            ..
        } in offsets
        {
            let Some(&to) = new.get(&partition) else {
                continue; // --to-offset leaves partitions it does not name alone
            };
            let from = committed.unwrap_or_else(|| starts.get(&partition).copied().unwrap_or(0));
            rows.push(PlanRow {
                topic: topic.clone(),
                partition,
                committed,
                new: to,
                end,
                again: from.min(end) - to,
            });
        }
    }
    Ok(Plan {
        stage: stage.to_string(),
        group: pipeline.group_id.clone(),
        rows,
    })
}

/// Commits the plan's offsets for its group. Refuses while the group has
/// members: a running stage would overwrite them with its own commits.
pub async fn apply_replay(settings: &Settings, plan: &Plan) -> anyhow::Result<()> {
    refuse_if_active(settings, &plan.group, &plan.stage).await?;
    let mut list = rdkafka::TopicPartitionList::new();
    for r in &plan.rows {
        list.add_partition_offset(&r.topic, r.partition, rdkafka::Offset::Offset(r.new))?;
    }
    let mut config = client_config(&settings.kafka)?;
    config
        .set("group.id", &plan.group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka client: {e}"))?;
    let group = plan.group.clone();
    tokio::task::spawn_blocking(move || {
        consumer
            .commit(&list, CommitMode::Sync)
            .map_err(|e| anyhow::anyhow!("committing new offsets for group {group}: {e}"))
    })
    .await?
}

async fn refuse_if_active(settings: &Settings, group: &str, stage: &str) -> anyhow::Result<()> {
    let g = describe_group(settings, group).await?;
    if !g.members.is_empty() {
        let names: Vec<String> = g.members.iter().map(|m| m.to_string()).collect();
        anyhow::bail!(
            "stage {stage} is running: consumer group {group} is {} with {} member(s): {}. Stop them first.",
            g.state,
            names.len(),
            names.join("; ")
        );
    }
    Ok(())
}

/// Records of `plan`'s partitions the group has not committed past yet.
pub async fn remaining(settings: &Settings, plan: &Plan) -> anyhow::Result<i64> {
    let reader = TopicReader::new(&settings.kafka)?;
    let mut topics: Vec<&String> = plan.rows.iter().map(|r| &r.topic).collect();
    topics.dedup();
    let mut left = 0;
    for topic in topics {
        for p in reader.group_offsets(&plan.group, topic).await? {
            if let Some(row) = plan
                .rows
                .iter()
                .find(|r| &r.topic == topic && r.partition == p.partition)
            {
                let at = p.committed.unwrap_or(row.new);
                left += (row.end - at).max(0);
            }
        }
    }
    Ok(left)
}

/// One stage's health for `ese status`.
#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub group: String,
    pub state: String,
    pub members: Vec<Member>,
    pub partitions: Vec<PartitionLag>,
    pub lag: i64,
    pub dlq: String,
    pub dlq_depth: i64,
    /// The reason of the newest dead letter, if any.
    pub newest_dead_letter: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub end: i64,
    pub lag: i64,
}

/// The status of every configured stage.
pub async fn status(settings: &Settings) -> anyhow::Result<Vec<StageStatus>> {
    let reader = TopicReader::new(&settings.kafka)?;
    let mut out = Vec::new();
    for (stage, pipeline) in &settings.pipelines {
        out.push(stage_status(settings, &reader, stage, pipeline).await?);
    }
    Ok(out)
}

async fn stage_status(
    settings: &Settings,
    reader: &TopicReader,
    stage: &str,
    pipeline: &Pipeline,
) -> anyhow::Result<StageStatus> {
    let group = describe_group(settings, &pipeline.group_id).await?;
    let mut partitions = Vec::new();
    for topic in &pipeline.inputs {
        for p in reader.group_offsets(&pipeline.group_id, topic).await? {
            partitions.push(PartitionLag {
                lag: p.lag(),
                topic: p.topic,
                partition: p.partition,
                committed: p.committed,
                end: p.end,
            });
        }
    }
    let (dlq_depth, newest) = dlq_depth_and_newest(reader, &pipeline.dlq).await?;
    Ok(StageStatus {
        stage: stage.to_string(),
        group: pipeline.group_id.clone(),
        state: group.state,
        members: group.members,
        lag: partitions.iter().map(|p| p.lag).sum(),
        partitions,
        dlq: pipeline.dlq.clone(),
        dlq_depth,
        newest_dead_letter: newest.map(|d| d.reason().unwrap_or_default()),
    })
}

/// Records on a dead-letter topic, and its newest one.
pub async fn dlq_depth_and_newest(
    reader: &TopicReader,
    dlq: &str,
) -> anyhow::Result<(i64, Option<DeadLetter>)> {
    let starts: BTreeMap<i32, i64> = reader.start_offsets(dlq).await?.into_iter().collect();
    let ends = reader.end_offsets(dlq).await?;
    let start = |p: &i32| starts.get(p).copied().unwrap_or(0);
    let depth = ends.iter().map(|(p, end)| (end - start(p)).max(0)).sum();
    let last: Vec<(i32, i64)> = ends
        .iter()
        .filter(|(p, end)| *end > start(p))
        .map(|(p, end)| (*p, end - 1))
        .collect();
    let newest = if last.is_empty() {
        None
    } else {
        reader
            .read_messages(dlq, &last)
            .await?
            .into_iter()
            .max_by_key(|m| m.timestamp().to_millis().unwrap_or(0))
            .map(DeadLetter::from)
    };
    Ok((depth, newest))
}

/// Renders statuses as a table.
pub fn render_status(all: &[StageStatus]) -> String {
    let mut out = format!(
        "{:<10} {:<20} {:>7} {:>8} {:>9}  {}\n",
        "stage", "group state", "members", "lag", "dlq", "newest dead letter"
    );
    for s in all {
        out.push_str(&format!(
            "{:<10} {:<20} {:>7} {:>8} {:>9}  {}\n",
            s.stage,
            s.state,
            s.members.len(),
            s.lag,
            s.dlq_depth,
            s.newest_dead_letter.as_deref().unwrap_or("-")
        ));
        for p in s.partitions.iter().filter(|p| p.lag > 0) {
            out.push_str(&format!(
                "           {}[{}] committed {} end {} lag {}\n",
                p.topic,
                p.partition,
                p.committed
                    .map_or_else(|| "-".to_string(), |c| c.to_string()),
                p.end,
                p.lag
            ));
        }
    }
    out
}

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
        self.header("ese.error")
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
        let topic = d.header("ese.source.topic").ok_or_else(|| {
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
                        !h.key.starts_with("ese.") || h.key == crate::runner::RECEIVED_AT_HEADER
                    })
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        headers.push(("ese.replayed-from".into(), from.into_bytes()));
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
