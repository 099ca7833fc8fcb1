//! Topic creation (partitions, replication, `min.insync.replicas`), waiting
//! until every partition has a leader.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::types::RDKafkaErrorCode;

use super::client_config;
use crate::config::KafkaConfig;

/// Creates `topics` with the configured partitions and replication; topics
/// that exist already are left alone. Returns the ones created now.
pub async fn create_topics(cfg: &KafkaConfig, topics: &[String]) -> anyhow::Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)?
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka admin client: {e}"))?;
    let min_isr = cfg.min_insync_replicas.to_string();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                cfg.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            )
            .set("min.insync.replicas", &min_isr)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create topics on {}: {e}", cfg.brokers))?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(t) => created.push(t),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => anyhow::bail!("cannot create topic {t}: {code}"),
        }
    }
    // Apache Kafka answers CreateTopics before every partition has a
    // leader; a client that reads or writes at once gets "not leader".
    let (client, names) = (admin, topics.to_vec());
    tokio::task::spawn_blocking(move || {
        wait_for_leaders(client.inner(), &names, Duration::from_secs(30))
    })
    .await??;
    Ok(created)
}

/// Waits until every partition of `topics` has a leader.
fn wait_for_leaders<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topics: &[String],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let md = client.fetch_metadata(None, Duration::from_secs(5))?;
        let waiting: Vec<&str> = topics
            .iter()
            .filter(|name| {
                !md.topics().iter().any(|t| {
                    t.name() == name.as_str()
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.leader() >= 0 && p.error().is_none())
                })
            })
            .map(String::as_str)
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "topics without a leader after {within:?}: {}",
                waiting.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
