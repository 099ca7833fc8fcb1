//! Shared Kafka settings: one place that builds every producer, consumer and
//! admin client, so all of them talk to the same brokers the same way.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::KafkaError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use rdkafka::message::ToBytes;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureRecord, Producer as _};
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
        .set("log_level", "3")
        .set("security.protocol", cfg.security_protocol.as_str());
    if cfg.security_protocol.uses_sasl() {
        let password = std::env::var(SASL_PASSWORD_ENV).map_err(|_| {
            anyhow::anyhow!(
                "kafka.security-protocol is {} but {SASL_PASSWORD_ENV} is not set (the SASL password is read from the environment only)",
                cfg.security_protocol.as_str().to_ascii_uppercase()
            )
        })?;
        c.set("sasl.mechanism", cfg.sasl_mechanism.as_str())
            .set("sasl.username", &cfg.sasl_username)
            .set("sasl.password", password);
    }
    if cfg.security_protocol.uses_tls() && !cfg.ssl_ca_file.is_empty() {
        c.set("ssl.ca.location", &cfg.ssl_ca_file);
    }
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    Ok(c)
}

/// Where the SASL password comes from: the environment only, never a file,
/// a flag or a log line.
pub const SASL_PASSWORD_ENV: &str = "KAFKA_SASL_PASSWORD";

/// Records the first error librdkafka reports that retrying will not cure
/// (credentials refused, a certificate not trusted, …), with the broker it
/// names.
#[derive(Default)]
struct FirstError(std::sync::Mutex<Option<String>>);

impl ClientContext for FirstError {
    fn error(&self, error: KafkaError, reason: &str) {
        let lasting = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
                    | RDKafkaErrorCode::InvalidArgument
                    | RDKafkaErrorCode::UnsupportedSASLMechanism
                    | RDKafkaErrorCode::IllegalSASLState
            )
        ) || reason.contains("SSL handshake failed")
            || reason.contains("SASL authentication error");
        if lasting {
            let mut first = self.0.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| reason.to_string());
        }
    }

    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, _: &str) {}
}

impl rdkafka::consumer::ConsumerContext for FirstError {}

/// Connects to the brokers once, before a command relies on them, and fails
/// with the broker's own words when that cannot work: credentials refused,
/// a certificate not trusted, nothing answering. Without this a client
/// retries such errors quietly forever.
pub async fn check_connection(cfg: &KafkaConfig, within: Duration) -> anyhow::Result<()> {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer<FirstError> = client_config(cfg)?
        .create_with_context(FirstError::default())
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka client: {e}"))?;
    let brokers = cfg.brokers.trim().to_string();
    let protocol = cfg.security_protocol.as_str().to_ascii_uppercase();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + within;
        loop {
            // Serves the client's error events into FirstError.
            let _ = consumer.poll(Duration::from_millis(100));
            if let Some(reason) = consumer
                .context()
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                anyhow::bail!("cannot connect to Kafka at {brokers} ({protocol}): {reason}");
            }
            match consumer.fetch_metadata(None, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => {
                    anyhow::bail!(
                        "cannot connect to Kafka at {brokers} ({protocol}) within {within:?}: {e}"
                    )
                }
                Err(_) => {}
            }
        }
    })
    .await?
}

/// The producers' librdkafka context: notes from the statistics whether the
/// idempotent producer holds its producer id. A new producer gets one only on
/// librdkafka's second 500 ms try (the first finds no connection yet), and
/// records sent before wait for it: ~1 s for the first webhooks of a fresh bridge.
pub struct ProducerContext {
    has_id: Arc<AtomicBool>,
}

impl ClientContext for ProducerContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        if let Some(eos) = &stats.eos {
            self.has_id
                .store(eos.idemp_state == "Assigned", Ordering::Relaxed);
        }
    }
}

type FutureProducer = rdkafka::producer::FutureProducer<ProducerContext>;

/// The engine's producer: idempotent, `acks=all`, recreated after a fatal
/// error. (An idempotent producer that loses an in-flight request may need an
/// epoch bump; a broker that refuses it fences the producer for good, which
/// would otherwise stall every later send.) Cheap to clone.
#[derive(Clone)]
pub struct Producer {
    cfg: Arc<KafkaConfig>,
    inner: Arc<RwLock<FutureProducer>>,
    /// Set by the current producer's [`ProducerContext`].
    has_id: Arc<AtomicBool>,
}

impl Producer {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let has_id = Arc::new(AtomicBool::new(false));
        Ok(Self {
            cfg: Arc::new(cfg.clone()),
            inner: Arc::new(RwLock::new(future_producer(cfg, &has_id)?)),
            has_id,
        })
    }

    /// Whether the producer can deliver now (it holds its producer id).
    pub fn has_id(&self) -> bool {
        self.has_id.load(Ordering::Relaxed)
    }

    /// Waits until the producer can deliver, at most `within`; false if it
    /// still cannot (broker unreachable: sends will wait or time out).
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        // Connecting now lets librdkafka's next try get the producer id.
        let producer = self.current();
        let _ = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, within))
            .await;
        while !self.has_id() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
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
        use futures::StreamExt;
        // Unordered: only the first error matters, and keeping thousands of
        // results in order (join_all) showed in the stages' profiles.
        let mut sends: futures::stream::FuturesUnordered<_> = records
            .into_iter()
            .map(|r| self.send(r, queue_timeout))
            .collect();
        let mut first = None;
        while let Some(result) = sends.next().await {
            if let (Err((e, _)), None) = (result, &first) {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
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
        self.has_id.store(false, Ordering::Relaxed);
        match future_producer(&self.cfg, &self.has_id) {
            Ok(p) => {
                warn!(%code, %reason, "producer hit a fatal error; replaced it");
                metrics::counter!(crate::metrics::names::KAFKA_PRODUCER_RECREATED_TOTAL)
                    .increment(1);
                *current = p;
            }
            Err(e) => warn!(error = %e, "producer hit a fatal error and cannot be recreated yet"),
        }
    }
}

fn future_producer(cfg: &KafkaConfig, has_id: &Arc<AtomicBool>) -> anyhow::Result<FutureProducer> {
    let mut c = client_config(cfg)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.linger.as_millis().to_string())
        .set(
            "message.timeout.ms",
            cfg.produce_timeout.as_millis().to_string(),
        )
        // Statistics tell when the producer holds its id (ProducerContext).
        .set("statistics.interval.ms", "500");
    c.create_with_context(ProducerContext {
        has_id: has_id.clone(),
    })
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

/// The partition ids of `topic`, from `consumer`'s metadata (blocking).
pub fn partitions<X: rdkafka::consumer::ConsumerContext>(
    consumer: &impl rdkafka::consumer::Consumer<X>,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<i32>> {
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
    Ok(partitions)
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
