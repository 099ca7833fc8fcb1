//! Operating the pipelines from the command line: where each stage's consumer
//! group stands (`ese status`), moving a group's offsets to process records
//! again (`ese replay`), and dead letters (`ese dlq`).
//!
//! Everything here talks to the broker through rdkafka (metadata, group
//! descriptions, committed offsets, Fetch), so it works the same on the
//! embedded broker and on Apache Kafka.

mod dlq;
mod replay;
mod status;

pub use dlq::*;
pub use replay::*;
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
