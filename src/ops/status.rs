//! `ese status`: where each stage's consumer group stands.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message;
use serde::Serialize;

use super::{DeadLetter, Member, describe_group};
use crate::config::{Pipeline, Settings};
use crate::kafka::TopicReader;

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

/// `ese status`: a table (or JSON), refreshed every 2 s with `watch`.
pub async fn status_command(settings: &Settings, watch: bool, json: bool) -> anyhow::Result<()> {
    loop {
        let all = status(settings).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render_status(&all));
        }
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
