//! Reading topics outside a consumer group: offsets, depths, records.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use super::{client_config, partitions};
use crate::config::KafkaConfig;

/// Reads topics outside any consumer group: end offsets, and the records
/// between given offsets and the end. Used to find what a crashed fan-out
/// already produced, and by replay and status to plan and measure lag.
///
/// End offsets are the high watermarks the broker reports in Fetch answers,
/// not ListOffsets(latest): the embedded broker answers the latter with the
/// first offset of the newest batch, short of the end. Each call uses its
/// own consumer, so a watermark is never one cached by an earlier call.
#[derive(Clone)]
pub struct TopicReader {
    config: ClientConfig,
    timeout: Duration,
}

impl TopicReader {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let mut c = client_config(cfg)?;
        // A group id is required by librdkafka even though this consumer only
        // uses `assign`; nothing is ever committed under it.
        c.set("group.id", format!("{}.reader", cfg.client_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "20");
        Ok(Self {
            config: c,
            timeout: Duration::from_secs(10),
        })
    }

    fn consumer(&self) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
        self.config
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create Kafka reader: {e}"))
    }

    /// The partition ids of `topic`.
    pub async fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        let (consumer, topic, timeout) = (self.consumer()?, topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || partitions(&consumer, &topic, timeout)).await?
    }

    /// `(partition, high watermark)` for every partition of `topic`.
    pub async fn end_offsets(&self, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
        let (consumer, topic, timeout) = (self.consumer()?, topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            // Start one record before the (possibly short) listed end, so the
            // first Fetch answer carries the real watermark.
            let from = partitions(&consumer, &topic, timeout)?
                .into_iter()
                .map(|p| {
                    let listed = watermarks(&consumer, &topic, p, timeout)?.1;
                    Ok((p, (listed - 1).max(0)))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            read(&consumer, &topic, &from, timeout * 6, |_| {})
        })
        .await?
    }

    /// `(partition, log start offset)` for every partition of `topic`.
    pub async fn start_offsets(&self, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
        let (consumer, topic, timeout) = (self.consumer()?, topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            partitions(&consumer, &topic, timeout)?
                .into_iter()
                .map(|p| Ok((p, watermarks(&consumer, &topic, p, timeout)?.0.max(0))))
                .collect()
        })
        .await?
    }

    /// Records on `topic` (end minus log start, over every partition).
    pub async fn depth(&self, topic: &str) -> anyhow::Result<i64> {
        let starts: std::collections::BTreeMap<i32, i64> =
            self.start_offsets(topic).await?.into_iter().collect();
        Ok(self
            .end_offsets(topic)
            .await?
            .iter()
            .map(|(p, end)| (end - starts.get(p).copied().unwrap_or(0)).max(0))
            .sum())
    }

    /// Per partition of `topic`, the first offset whose record is at or after
    /// `at_ms` (ms since the epoch); None where every record is older.
    pub async fn offsets_for_time(
        &self,
        topic: &str,
        at_ms: i64,
    ) -> anyhow::Result<Vec<(i32, Option<i64>)>> {
        let (consumer, topic, timeout) = (self.consumer()?, topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::Consumer;
            let mut list = rdkafka::TopicPartitionList::new();
            for p in partitions(&consumer, &topic, timeout)? {
                list.add_partition_offset(&topic, p, rdkafka::Offset::Offset(at_ms))?;
            }
            let found = consumer.offsets_for_times(list, timeout)?;
            Ok(found
                .elements()
                .iter()
                .map(|e| {
                    let offset = match e.offset() {
                        rdkafka::Offset::Offset(o) if o >= 0 => Some(o),
                        _ => None,
                    };
                    (e.partition(), offset)
                })
                .collect())
        })
        .await?
    }

    /// Per partition of `topic`: the offset `group` has committed (None if
    /// none) and the end, so lag = end − committed.
    pub async fn group_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> anyhow::Result<Vec<PartitionOffsets>> {
        let ends = self.end_offsets(topic).await?;
        let mut config = self.config.clone();
        config.set("group.id", group);
        let (topic, timeout) = (topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::Consumer;
            let consumer: rdkafka::consumer::BaseConsumer = config
                .create()
                .map_err(|e| anyhow::anyhow!("cannot create Kafka reader: {e}"))?;
            let mut list = rdkafka::TopicPartitionList::new();
            for (p, _) in &ends {
                list.add_partition(&topic, *p);
            }
            let committed = consumer.committed_offsets(list, timeout)?;
            Ok(ends
                .into_iter()
                .map(|(partition, end)| {
                    let committed =
                        committed.find_partition(&topic, partition).and_then(|e| {
                            match e.offset() {
                                rdkafka::Offset::Offset(o) => Some(o),
                                _ => None,
                            }
                        });
                    PartitionOffsets {
                        topic: topic.clone(),
                        partition,
                        committed,
                        end,
                    }
                })
                .collect())
        })
        .await?
    }

    /// The payloads of `topic` from `from` (partition → offset) up to the
    /// partitions' ends as they were when the read began.
    pub async fn read_to_end(
        &self,
        topic: &str,
        from: &[(i32, i64)],
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        let (consumer, topic, timeout) = (self.consumer()?, topic.to_string(), self.timeout);
        let from = from.to_vec();
        tokio::task::spawn_blocking(move || {
            use rdkafka::Message;
            let mut out = Vec::new();
            read(&consumer, &topic, &from, timeout * 6, |m| {
                out.push(m.payload().unwrap_or_default().to_vec())
            })?;
            Ok(out)
        })
        .await?
    }

    /// Like [`TopicReader::read_to_end`], whole records (key, headers, timestamp).
    pub async fn read_messages(
        &self,
        topic: &str,
        from: &[(i32, i64)],
    ) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
        let (consumer, topic, timeout) = (self.consumer()?, topic.to_string(), self.timeout);
        let from = from.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            read(&consumer, &topic, &from, timeout * 6, |m| {
                out.push(m.detach())
            })?;
            Ok(out)
        })
        .await?
    }
}

/// Where a consumer group stands on one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionOffsets {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset; None when it has committed nothing.
    pub committed: Option<i64>,
    /// The partition's high watermark.
    pub end: i64,
}

impl PartitionOffsets {
    /// Records not yet committed (all of them when nothing is committed).
    pub fn lag(&self) -> i64 {
        (self.end - self.committed.unwrap_or(0)).max(0)
    }
}

/// `(low, high)` watermarks of a partition, asked again while its leader
/// is moving (just created, a broker lost) for up to `timeout`.
fn watermarks<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<(i64, i64)> {
    use rdkafka::consumer::Consumer;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match consumer.fetch_watermarks(topic, partition, timeout) {
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::NotLeaderForPartition
                            | RDKafkaErrorCode::LeaderNotAvailable
                            | RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::NotCoordinator
                    )
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Reads `topic` from `from` until each partition reaches the high watermark
/// of the first Fetch answer for it; hands each payload to `each` and returns
/// `(partition, end)`.
fn read(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    from: &[(i32, i64)],
    within: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<Vec<(i32, i64)>> {
    use rdkafka::Message;
    use rdkafka::consumer::Consumer;
    let mut list = rdkafka::TopicPartitionList::new();
    // partition → (next offset to read, end once known)
    let mut state = std::collections::BTreeMap::new();
    for &(p, offset) in from {
        list.add_partition_offset(topic, p, rdkafka::Offset::Offset(offset))?;
        state.insert(p, (offset, None::<i64>));
    }
    consumer.assign(&list)?;
    let deadline = std::time::Instant::now() + within;
    let finished = |state: &std::collections::BTreeMap<i32, (i64, Option<i64>)>| {
        state
            .values()
            .all(|(next, end)| end.is_some_and(|end| *next >= end))
    };
    while !finished(&state) {
        if std::time::Instant::now() > deadline {
            consumer.unassign()?;
            anyhow::bail!("reading {topic}: timed out before reaching the end");
        }
        let polled = consumer.poll(Duration::from_millis(50)).transpose()?;
        for (p, (_, end)) in state.iter_mut().filter(|(_, s)| s.1.is_none()) {
            let high = fetched_high_watermark(consumer, topic, *p)?;
            if high >= 0 {
                *end = Some(high);
            }
        }
        if let Some(msg) = polled
            && let Some((next, end)) = state.get_mut(&msg.partition())
        {
            if end.is_none_or(|end| msg.offset() < end) {
                each(&msg);
            }
            *next = msg.offset() + 1;
        }
    }
    consumer.unassign()?;
    Ok(state
        .into_iter()
        .map(|(p, (next, end))| (p, end.unwrap_or(next)))
        .collect())
}

/// The high watermark of the last Fetch answer for `partition`
/// (negative before the first). rdkafka does not wrap this librdkafka call.
fn fetched_high_watermark(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
) -> anyhow::Result<i64> {
    use rdkafka::consumer::Consumer;
    let name = std::ffi::CString::new(topic)?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle lives as long as `consumer`; the call only
    // reads the partition's offsets into the two locals.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            name.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        anyhow::bail!(
            "{topic}[{partition}]: {}",
            rdkafka::types::RDKafkaErrorCode::from(err)
        );
    }
    Ok(high)
}
