//! Shared Kafka settings: one place that builds every producer, consumer and
//! admin client, so all of them talk to the same brokers the same way.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use std::sync::{Arc, RwLock};

use rdkafka::message::ToBytes;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use tracing::warn;

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
        .set("log_level", "3");
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    Ok(c)
}

/// The engine's producer: idempotent, `acks=all`, recreated after a fatal
/// error. (An idempotent producer that loses an in-flight request may need an
/// epoch bump; a broker that refuses it fences the producer for good, which
/// would otherwise stall every later send.) Cheap to clone.
#[derive(Clone)]
pub struct Producer {
    cfg: Arc<KafkaConfig>,
    inner: Arc<RwLock<FutureProducer>>,
}

impl Producer {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        Ok(Self {
            cfg: Arc::new(cfg.clone()),
            inner: Arc::new(RwLock::new(future_producer(cfg)?)),
        })
    }

    /// The current rdkafka producer.
    pub fn current(&self) -> FutureProducer {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends one record and waits for the broker's acknowledgement; a fatal
    /// producer error replaces the producer for the next send.
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> OwnedDeliveryResult
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let producer = self.current();
        let result = producer.send(record, queue_timeout).await;
        if let Err((e, _)) = &result {
            self.recover(&producer, e);
        }
        result
    }

    /// Sends every record and waits for all acknowledgements; the first
    /// error, if any, is returned once all have settled.
    pub async fn send_all(
        &self,
        records: Vec<FutureRecord<'_, [u8], [u8]>>,
        queue_timeout: Duration,
    ) -> Result<(), KafkaError> {
        let sends = records.into_iter().map(|r| self.send(r, queue_timeout));
        match futures::future::join_all(sends)
            .await
            .into_iter()
            .find_map(Result::err)
        {
            Some((e, _)) => Err(e),
            None => Ok(()),
        }
    }

    fn recover(&self, failed: &FutureProducer, error: &KafkaError) {
        let (code, reason) = match failed.client().fatal_error() {
            Some(fatal) => fatal,
            None => match error.rdkafka_error_code() {
                Some(
                    code @ (RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::Fatal),
                ) => (code, error.to_string()),
                _ => return,
            },
        };
        let mut current = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if !std::ptr::eq(current.client().native_ptr(), failed.client().native_ptr()) {
            return; // someone replaced it already
        }
        match future_producer(&self.cfg) {
            Ok(p) => {
                warn!(%code, %reason, "producer hit a fatal error; replaced it");
                metrics::counter!("ese_kafka_producer_recreated_total").increment(1);
                *current = p;
            }
            Err(e) => warn!(error = %e, "producer hit a fatal error and cannot be recreated yet"),
        }
    }
}

fn future_producer(cfg: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    let mut c = client_config(cfg)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.linger.as_millis().to_string())
        .set(
            "message.timeout.ms",
            cfg.produce_timeout.as_millis().to_string(),
        );
    c.create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka producer: {e}"))
}

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

/// Creates `topics` with the configured partitions and replication; topics
/// that exist already are left alone. Returns the ones created now.
pub async fn create_topics(cfg: &KafkaConfig, topics: &[String]) -> anyhow::Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)?
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka admin client: {e}"))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                cfg.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            )
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
    Ok(created)
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

/// Reads topics outside any consumer group: end offsets, and the records
/// between given offsets and the end. Used to find what a crashed fan-out
/// already produced, and by replay to plan offset resets. Cheap to clone.
#[derive(Clone)]
pub struct TopicReader {
    consumer: Arc<rdkafka::consumer::BaseConsumer>,
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
            .set("enable.partition.eof", "false");
        Ok(Self {
            consumer: Arc::new(
                c.create()
                    .map_err(|e| anyhow::anyhow!("cannot create Kafka reader: {e}"))?,
            ),
            timeout: Duration::from_secs(10),
        })
    }

    /// `(partition, high watermark)` for every partition of `topic`.
    pub async fn end_offsets(&self, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
        let (consumer, topic, timeout) = (self.consumer.clone(), topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || end_offsets(&consumer, &topic, timeout)).await?
    }

    /// The payloads of `topic` from `from` (partition → offset) up to the
    /// partitions' current ends.
    pub async fn read_to_end(
        &self,
        topic: &str,
        from: &[(i32, i64)],
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        use rdkafka::Message;
        use rdkafka::consumer::Consumer;
        let (consumer, topic, timeout) = (self.consumer.clone(), topic.to_string(), self.timeout);
        let from = from.to_vec();
        tokio::task::spawn_blocking(move || {
            let ends: std::collections::HashMap<i32, i64> =
                end_offsets(&consumer, &topic, timeout)?
                    .into_iter()
                    .collect();
            let mut list = rdkafka::TopicPartitionList::new();
            let mut remaining = std::collections::HashMap::new();
            for (p, offset) in from {
                let end = ends.get(&p).copied().unwrap_or(offset);
                if end > offset {
                    list.add_partition_offset(&topic, p, rdkafka::Offset::Offset(offset))?;
                    remaining.insert(p, end);
                }
            }
            let mut out = Vec::new();
            if remaining.is_empty() {
                return Ok(out);
            }
            consumer.assign(&list)?;
            let deadline = std::time::Instant::now() + timeout * 6;
            while !remaining.is_empty() {
                if std::time::Instant::now() > deadline {
                    consumer.unassign()?;
                    anyhow::bail!("reading {topic}: timed out before reaching the end");
                }
                let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let msg = msg?;
                let p = msg.partition();
                if let Some(&end) = remaining.get(&p) {
                    if msg.offset() < end {
                        out.push(msg.payload().unwrap_or_default().to_vec());
                    }
                    if msg.offset() + 1 >= end {
                        remaining.remove(&p);
                    }
                }
            }
            consumer.unassign()?;
            Ok(out)
        })
        .await?
    }
}

fn end_offsets(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<(i32, i64)>> {
    use rdkafka::consumer::Consumer;
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
    partitions
        .into_iter()
        .map(|p| Ok((p, consumer.fetch_watermarks(topic, p, timeout)?.1)))
        .collect()
}
