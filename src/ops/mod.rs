//! Operating the pipelines from the command line: where each stage's consumer
//! group stands (`ese status`), moving a group's offsets to process records
//! again (`ese replay`), dead letters (`ese dlq`), and deleting the audit
//! trail's expired rows (`ese retention`).
//!
//! Everything here talks to the broker through rdkafka (metadata, group
//! descriptions, committed offsets, Fetch), so it works the same on the
//! embedded broker and on Apache Kafka.

mod dlq;
mod replay;
mod retention;
pub mod schemas;
mod status;

pub use dlq::*;
pub use replay::*;
pub use retention::*;
pub use status::*;

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::config::Settings;
use crate::kafka::client_config;

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

/// Commits `offsets` (topic, partition, next offset) for `group`, which must
/// have no members (the caller checks): `ese replay` moving a stage, `ese
/// dlq replay` marking what it put back.
pub async fn commit_offsets(
    settings: &Settings,
    group: &str,
    offsets: &[(String, i32, i64)],
) -> anyhow::Result<()> {
    let mut list = rdkafka::TopicPartitionList::new();
    for (topic, partition, offset) in offsets {
        list.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset))?;
    }
    let mut config = client_config(&settings.kafka)?;
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: rdkafka::consumer::BaseConsumer = config
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka client: {e}"))?;
    let group = group.to_string();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        consumer
            .commit(&list, rdkafka::consumer::CommitMode::Sync)
            .map_err(|e| anyhow::anyhow!("committing offsets for group {group}: {e}"))
    })
    .await?
}

/// The consumer group whose committed offsets on a stage's DLQ mark what
/// `ese dlq replay` has put back: everything before them is handled.
pub fn dlq_replay_group(pipeline: &crate::config::Pipeline) -> String {
    format!("{}.dlq-replay", pipeline.group_id)
}

/// Dead letters of `pipeline` not yet replayed: per DLQ partition, the end
/// minus the later of the replay group's commit and the log start.
pub async fn dlq_unreplayed(
    reader: &crate::kafka::TopicReader,
    pipeline: &crate::config::Pipeline,
) -> anyhow::Result<i64> {
    let starts: std::collections::BTreeMap<i32, i64> = reader
        .start_offsets(&pipeline.dlq)
        .await?
        .into_iter()
        .collect();
    Ok(reader
        .group_offsets(&dlq_replay_group(pipeline), &pipeline.dlq)
        .await?
        .iter()
        .map(|p| {
            let done = p
                .committed
                .unwrap_or(0)
                .max(starts.get(&p.partition).copied().unwrap_or(0));
            (p.end - done).max(0)
        })
        .sum())
}
