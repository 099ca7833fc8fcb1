//! The stage runner: the one consumer loop every stage uses.
//!
//! A stage ([`Stage`]) owns only its domain logic: decode a record, apply a
//! batch's effects inside one Postgres transaction, and hand output records
//! to a [`Collector`]. The runner owns everything else:
//!
//! - Kafka: a `StreamConsumer` with `enable.auto.offset.store=false`; records
//!   go to one of `concurrency` workers by partition, so order within a
//!   partition holds and no gap tracking is needed. Each partition has its own
//!   librdkafka queue and reader, so a worker with a backlog holds up only its
//!   own partitions; each worker's channel holds two batches.
//! - Batches: a worker gathers up to `batch-size` records (or waits
//!   `max-wait`), opens a transaction, runs the stage, commits, produces the
//!   outputs and dead letters and waits for the broker's acknowledgements, and
//!   only then stores each partition's offset. The acknowledgements of one
//!   batch are awaited while the next is gathered and applied; its outputs
//!   are produced only after the previous batch's were acknowledged, so
//!   outputs keep their order and offsets are stored in order. At-least-once;
//!   the stages' sinks are idempotent, so a redelivery changes nothing, and a
//!   record seen downstream always finds its upstream effects committed.
//! - Errors: transient (connection lost, broker down) → the batch is retried
//!   with capped exponential backoff, nothing stored; poison (undecodable,
//!   invalid data, a constraint violation) → the record goes to the DLQ with
//!   headers naming why and where from, and the rest goes on; fatal → the
//!   stage stops with the reason.
//! - Rebalance: a revoke removes the partitions from the owned set under the
//!   same lock offsets are stored under, so no offset is ever stored for a
//!   partition no longer owned, and retries of revoked work are dropped.
//! - Shutdown: stop fetching, finish queued batches, commit, return.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, Transaction};
use metrics::{counter, gauge, histogram};
use rand::Rng;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
    stream_consumer::StreamPartitionQueue,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::statistics::Statistics;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::codec::CodecError;
use crate::config::{KafkaConfig, Pipeline};
use crate::db::{self, ErrorClass};

/// Header carrying the time (ms since the epoch) the bridge received a webhook;
/// the runner turns it into the end-to-end latency histogram.
pub const RECEIVED_AT_HEADER: &str = "ese.received-at";

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
    fn from_message<M: Message>(m: &M) -> Self {
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

/// Where a stage puts its outputs and names its poison records; once the
/// batch has committed, what it still owes the broker.
#[derive(Debug, Default)]
pub struct Collector {
    outputs: Vec<OutRecord>,
    dead: Vec<(usize, String)>,
}

impl Collector {
    /// Produce `payload` on `topic` keyed by `key`, acknowledged before the
    /// batch's offsets are stored.
    pub fn send(&mut self, topic: &str, key: impl Into<Vec<u8>>, payload: Vec<u8>) {
        self.send_with_headers(topic, key, payload, Vec::new());
    }

    /// Like [`Collector::send`], with headers.
    pub fn send_with_headers(
        &mut self,
        topic: &str,
        key: impl Into<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    ) {
        self.outputs.push(OutRecord {
            topic: topic.to_string(),
            key: key.into(),
            payload,
            headers,
        });
    }

    /// Marks the batch item at `index` as poison: it goes to the DLQ with `reason`.
    pub fn dead_letter(&mut self, index: usize, reason: impl Into<String>) {
        self.dead.push((index, reason.into()));
    }

    /// Takes over `other`'s outputs and dead letters, whose indexes count
    /// from `base` in this one's batch.
    fn append(&mut self, other: Collector, base: usize) {
        self.outputs.extend(other.outputs);
        self.dead
            .extend(other.dead.into_iter().map(|(i, r)| (base + i, r)));
    }
}

/// A stage: decode records, apply a batch in one transaction, emit outputs.
pub trait Stage: Send + Sync + 'static {
    /// A decoded input record.
    type Input: Send + Sync + 'static;

    /// The stage's name (its `pipelines/<name>.toml`), used in metrics and DLQ headers.
    fn name(&self) -> &'static str;

    /// Decodes one record; `Poison` sends it to the DLQ.
    fn decode(
        &self,
        record: &InRecord,
    ) -> impl Future<Output = Result<Self::Input, StageError>> + Send;

    /// Called after every rebalance with the partitions this process now owns.
    fn assigned(&self, _owned: &[(String, i32)]) {}

    /// Applies `batch` inside `tx` and collects its outputs. Outputs must follow
    /// from the input and committed state, not from whether this attempt
    /// changed a row, so a replayed record produces them again.
    fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<Self::Input>],
        out: &mut Collector,
    ) -> impl Future<Output = Result<(), StageError>> + Send;
}

/// A topic partition.
type Partition = (String, i32);

/// Partitions this consumer owns, each with the epoch of the assignment that
/// gave it; looked up by `&str` topic, as every record is, without allocating.
#[derive(Default)]
struct Assignment(HashMap<String, HashMap<i32, u64>>);

impl Assignment {
    fn epoch(&self, topic: &str, partition: i32) -> Option<u64> {
        self.0.get(topic)?.get(&partition).copied()
    }

    fn insert(&mut self, topic: &str, partition: i32, epoch: u64) {
        self.0
            .entry(topic.to_string())
            .or_default()
            .insert(partition, epoch);
    }

    fn remove(&mut self, topic: &str, partition: i32) {
        if let Some(parts) = self.0.get_mut(topic) {
            parts.remove(&partition);
        }
    }

    fn partitions(&self) -> Vec<Partition> {
        self.0
            .iter()
            .flat_map(|(t, parts)| parts.keys().map(|p| (t.clone(), *p)))
            .collect()
    }
}

type Owned = Arc<Mutex<Assignment>>;

/// Consumer context: tracks the assignment for safe offset storing and
/// exports consumer lag from librdkafka statistics.
pub struct RunnerContext {
    stage: &'static str,
    owned: Owned,
    epoch: std::sync::atomic::AtomicU64,
    /// Told the partitions owned after every rebalance ([`Stage::assigned`]).
    on_change: Box<dyn Fn(Vec<Partition>) + Send + Sync>,
}

impl RunnerContext {
    fn changed(&self, owned: &Assignment) {
        (self.on_change)(owned.partitions());
    }
}

impl ClientContext for RunnerContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                gauge!("ese_kafka_consumer_lag_records", "stage" => self.stage, "topic" => topic.clone(), "partition" => p.to_string())
                    .set(part.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for RunnerContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
            for e in tpl.elements() {
                owned.remove(e.topic(), e.partition());
            }
            self.changed(&owned);
            info!(
                stage = self.stage,
                partitions = tpl.count(),
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let epoch = self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
            for e in tpl.elements() {
                owned.insert(e.topic(), e.partition(), epoch);
            }
            self.changed(&owned);
            info!(
                stage = self.stage,
                partitions = tpl.count(),
                "partitions assigned"
            );
        }
    }
}

/// A record on its way to a worker, with the assignment epoch it was fetched under.
struct Dispatched {
    record: InRecord,
    epoch: u64,
}

/// What every worker shares.
struct Shared<S: Stage> {
    stage: Arc<S>,
    pipeline: Pipeline,
    pool: Pool,
    producer: crate::kafka::Producer,
    consumer: Arc<StreamConsumer<RunnerContext>>,
    owned: Owned,
    produce_timeout: Duration,
    shutdown: CancellationToken,
}

/// Runs `stage` until `shutdown` is cancelled (then drains and returns `Ok`)
/// or a fatal error (returned).
pub async fn run<S: Stage>(
    stage: Arc<S>,
    pipeline: Pipeline,
    kafka: &KafkaConfig,
    pool: Pool,
    producer: crate::kafka::Producer,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = stage.name();
    let owned: Owned = Arc::default();
    let notify = stage.clone();
    let context = RunnerContext {
        stage: name,
        owned: owned.clone(),
        epoch: Default::default(),
        on_change: Box::new(move |parts| notify.assigned(&parts)),
    };
    let workers_n = pipeline.concurrency.max(1);
    let batch_size = pipeline.batch_size.max(1);
    let mut config = crate::kafka::consumer_config(kafka, &pipeline.group_id)?;
    // Each partition has its own prefetch queue (below), so librdkafka's
    // prefetch bound applies per partition: keep it to a few batches. A
    // partition whose queue is full is fetched again only after
    // `fetch.queue.backoff.ms` (1 s by default); a worker drained its queues
    // sooner and then starved (`ese bench webhooks`: workers waited ~25 ms a
    // batch for records; at 10 ms normalize went from 80-88k to 91-106k
    // records/s).
    config
        .set("queued.min.messages", (4 * batch_size).to_string())
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.queue.backoff.ms", "10");
    for (k, v) in &pipeline.consumer_options {
        config.set(k, v);
    }
    let consumer: StreamConsumer<RunnerContext> = config
        .create_with_context(context)
        .map_err(|e| anyhow::anyhow!("stage {name}: cannot create consumer: {e}"))?;
    let consumer = Arc::new(consumer);
    let queues = split_partitions(name, &consumer, &pipeline.inputs).await;
    let topics: Vec<&str> = pipeline.inputs.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| anyhow::anyhow!("stage {name}: cannot subscribe to {topics:?}: {e}"))?;
    info!(stage = name, group = %pipeline.group_id, inputs = ?pipeline.inputs, "stage started");

    let shared = Arc::new(Shared {
        stage,
        pipeline,
        pool,
        producer,
        consumer: consumer.clone(),
        owned: owned.clone(),
        produce_timeout: kafka.produce_timeout,
        shutdown: shutdown.clone(),
    });
    let mut senders = Vec::with_capacity(workers_n);
    let mut workers = JoinSet::new();
    for _ in 0..workers_n {
        let (tx, rx) = mpsc::channel::<Dispatched>(2 * batch_size);
        senders.push(tx);
        let shared = shared.clone();
        workers.spawn(async move { worker(shared, rx).await });
    }
    let worker_of = |partition: i32| partition.unsigned_abs() as usize % workers_n;
    // One handle, not a registry lookup per record.
    let consumed = counter!("ese_stage_records_consumed_total", "stage" => name);
    // One reader per split partition feeds that partition's worker, so a
    // worker with a backlog holds up only its own partitions.
    let readers = CancellationToken::new();
    let mut reader_tasks = JoinSet::new();
    for (partition, queue) in queues {
        let (tx, owned, stop, consumed) = (
            senders[worker_of(partition)].clone(),
            owned.clone(),
            readers.clone(),
            consumed.clone(),
        );
        reader_tasks.spawn(async move {
            loop {
                let d = tokio::select! {
                    _ = stop.cancelled() => return,
                    msg = queue.recv() => dispatched(name, msg, &owned, &consumed).await,
                };
                if let Some(d) = d {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        sent = tx.send(d) => if sent.is_err() { return },
                    }
                }
            }
        });
    }

    // The main queue serves rebalances and statistics, and carries records
    // of partitions that were not split (created after the stage started).
    let mut fatal: Option<anyhow::Error> = None;
    'fetch: loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = workers.join_next() => {
                fatal = Some(worker_end(name, done));
                break;
            }
            msg = consumer.recv() => msg,
        };
        let Some(d) = dispatched(name, msg, &owned, &consumed).await else {
            continue;
        };
        let tx = &senders[worker_of(d.record.partition)];
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break 'fetch,
            Some(done) = workers.join_next() => {
                fatal = Some(worker_end(name, done));
                break 'fetch;
            }
            // A send fails only when the worker is gone; its end is collected above.
            _ = tx.send(d) => {}
        }
    }
    readers.cancel();
    while reader_tasks.join_next().await.is_some() {}

    // Stop fetching, let workers finish what they have.
    drop(senders);
    while let Some(done) = workers.join_next().await {
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            fatal.get_or_insert(e);
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(e) => debug!(stage = name, error = %e, "final commit"),
    }
    consumer.unsubscribe();
    match fatal {
        Some(e) => {
            error!(stage = name, error = %e, "stage stopped");
            Err(e)
        }
        None => {
            info!(stage = name, "stage stopped cleanly");
            Ok(())
        }
    }
}

/// A consumed record tagged with the assignment epoch it was fetched under;
/// `None` after a consume error (counted and logged, then a short pause).
async fn dispatched(
    name: &'static str,
    msg: KafkaResult<BorrowedMessage<'_>>,
    owned: &Owned,
    consumed: &metrics::Counter,
) -> Option<Dispatched> {
    let record = match msg {
        Ok(m) => InRecord::from_message(&m),
        Err(e) => {
            counter!("ese_kafka_consume_errors_total", "stage" => name).increment(1);
            warn!(stage = name, error = %e, "consume error");
            tokio::time::sleep(Duration::from_millis(200)).await;
            return None;
        }
    };
    consumed.increment(1);
    let epoch = owned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .epoch(&record.topic, record.partition)
        .unwrap_or(0);
    Some(Dispatched { record, epoch })
}

/// Gives every partition of `topics` its own librdkafka queue, before the
/// subscription, so librdkafka's long runs of one partition no longer queue
/// the other partitions' records behind them. librdkafka keeps a split queue
/// across rebalances. A topic whose metadata cannot be read stays on the main
/// queue (still correct, only without the parallelism).
async fn split_partitions(
    name: &'static str,
    consumer: &Arc<StreamConsumer<RunnerContext>>,
    topics: &[String],
) -> Vec<(i32, StreamPartitionQueue<RunnerContext>)> {
    let mut queues = Vec::new();
    for topic in topics {
        let (c, t) = (consumer.clone(), topic.clone());
        let partitions = tokio::task::spawn_blocking(move || {
            crate::kafka::partitions(c.as_ref(), &t, Duration::from_secs(10))
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        match partitions {
            Ok(ps) => {
                for p in ps {
                    if let Some(q) = consumer.split_partition_queue(topic, p) {
                        queues.push((p, q));
                    }
                }
            }
            Err(e) => {
                warn!(stage = name, topic = %topic, error = %e, "no partition metadata; the topic is read from the main queue")
            }
        }
    }
    queues
}

fn worker_end(
    name: &str,
    done: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Error {
    match done {
        Ok(Err(e)) => e,
        Ok(Ok(())) => anyhow::anyhow!("stage {name}: a worker ended unexpectedly"),
        Err(e) => anyhow::anyhow!("stage {name}: a worker panicked: {e}"),
    }
}

async fn worker<S: Stage>(
    shared: Arc<Shared<S>>,
    mut rx: mpsc::Receiver<Dispatched>,
) -> anyhow::Result<()> {
    let batch_size = shared.pipeline.batch_size.max(1);
    // The previous batch, committed, waiting for its acknowledgements.
    let mut settling: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let settled = |done: Result<anyhow::Result<()>, tokio::task::JoinError>| {
        done.map_err(|e| {
            anyhow::anyhow!("stage {}: settling a batch panicked: {e}", shared.name())
        })?
    };
    loop {
        let tw = Instant::now();
        // The next record; a settling batch that fails meanwhile stops the worker.
        let next = loop {
            let Some(handle) = settling.as_mut() else {
                break rx.recv().await;
            };
            let done = tokio::select! {
                next = rx.recv() => break next,
                done = handle => done,
            };
            settling = None;
            settled(done)?;
        };
        let Some(first) = next else {
            break;
        };
        let mut batch = Vec::with_capacity(batch_size);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + shared.pipeline.max_wait;
        while batch.len() < batch_size {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(d)) => batch.push(d),
                        _ => break,
                    }
                }
            }
        }
        phase_done(shared.name(), "gather", tw);
        let committed = shared.handle_batch(batch).await?;
        if let Some(previous) = settling.take() {
            let t = Instant::now();
            settled(previous.await)?;
            phase_done(shared.name(), "acks", t);
        }
        if let Some((batch, owed, started)) = committed {
            settling = Some(tokio::spawn(shared.clone().settle(batch, owed, started)));
        }
    }
    match settling {
        Some(last) => settled(last.await),
        None => Ok(()),
    }
}

/// The records of one batch: decoded items (with the assignment epoch each
/// was fetched under) and records already known to be poison.
struct Batch<T> {
    items: Vec<Item<T>>,
    epochs: Vec<u64>,
    dead: Vec<(InRecord, String, u64)>,
}

impl<T> Batch<T> {
    fn new() -> Self {
        Self {
            items: Vec::new(),
            epochs: Vec::new(),
            dead: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.items.len() + self.dead.len()
    }

    /// Every record with its epoch, live or dead.
    fn records(&self) -> impl Iterator<Item = (&InRecord, u64)> {
        self.items
            .iter()
            .zip(self.epochs.iter().copied())
            .map(|(i, e)| (&i.record, e))
            .chain(self.dead.iter().map(|(r, _, e)| (r, *e)))
    }

    /// Moves every live item to the dead list with `reason`.
    fn kill_all(&mut self, reason: &str) {
        for (item, epoch) in self.items.drain(..).zip(self.epochs.drain(..)) {
            self.dead.push((item.record, reason.to_string(), epoch));
        }
    }

    /// Splits into single-record batches (dead records travel in the first).
    fn singles(self) -> Vec<Batch<T>> {
        let mut out: Vec<Batch<T>> = Vec::with_capacity(self.items.len() + 1);
        let mut first = Batch::new();
        first.dead = self.dead;
        out.push(first);
        for (item, epoch) in self.items.into_iter().zip(self.epochs) {
            out.push(Batch {
                items: vec![item],
                epochs: vec![epoch],
                dead: Vec::new(),
            });
        }
        out
    }

    fn absorb(&mut self, other: Batch<T>) {
        self.items.extend(other.items);
        self.epochs.extend(other.epochs);
        self.dead.extend(other.dead);
    }
}

enum Attempt {
    Done,
    /// Shutting down, or every partition was revoked while retrying: nothing stored.
    Abandoned,
}

impl<S: Stage> Shared<S> {
    fn name(&self) -> &'static str {
        self.stage.name()
    }

    /// Decodes and applies a batch; the committed batch and what it owes the
    /// broker, or `None` when it was abandoned (shutting down, partitions revoked).
    async fn handle_batch(
        &self,
        dispatched: Vec<Dispatched>,
    ) -> anyhow::Result<Option<(Batch<S::Input>, Collector, Instant)>> {
        let started = Instant::now();
        let name = self.name();
        let mut batch = Batch::new();
        for d in dispatched {
            let decoded = match self.stage.decode(&d.record).await {
                // A transient decode error (registry unreachable) must not drop
                // the record: decode again after a backoff.
                Err(StageError::Transient(e)) => match self.decode_retrying(&d.record, e).await? {
                    Some(v) => Ok(v),
                    None => return Ok(None), // shutting down: nothing stored
                },
                other => other,
            };
            match decoded {
                Ok(value) => {
                    batch.items.push(Item {
                        record: d.record,
                        value,
                    });
                    batch.epochs.push(d.epoch);
                }
                Err(StageError::Poison(reason)) => batch.dead.push((d.record, reason, d.epoch)),
                Err(e) => anyhow::bail!("stage {name}: decoding {}: {e}", d.record.coordinates()),
            }
        }
        phase_done(name, "decode", started);
        histogram!("ese_stage_batch_size_records", "stage" => name).record(batch.len() as f64);

        match self.apply_retrying(batch).await? {
            (_, _, Attempt::Abandoned) => Ok(None),
            (batch, owed, Attempt::Done) => Ok(Some((batch, owed, started))),
        }
    }

    /// Produces a committed batch's outputs and dead letters (retrying while
    /// the broker is unreachable), then stores its offsets.
    async fn settle(
        self: Arc<Self>,
        batch: Batch<S::Input>,
        owed: Collector,
        started: Instant,
    ) -> anyhow::Result<()> {
        let name = self.name();
        let t = Instant::now();
        let dead: Vec<(&InRecord, &str)> = batch
            .dead
            .iter()
            .map(|(r, reason, _)| (r, reason.as_str()))
            .chain(owed.dead.iter().filter_map(|(i, reason)| {
                batch
                    .items
                    .get(*i)
                    .map(|item| (&item.record, reason.as_str()))
            }))
            .collect();
        let mut attempt = 0u32;
        loop {
            match self.produce(&owed.outputs, &dead).await {
                Ok(()) => break,
                Err(StageError::Transient(e)) => {
                    if !self.backoff(attempt, &e).await? {
                        return Ok(()); // shutting down: nothing stored
                    }
                    attempt += 1;
                }
                Err(e) => anyhow::bail!("stage {name}: {e}"),
            }
        }
        phase_done(name, "produce", t);
        for (r, reason) in &dead {
            counter!("ese_stage_records_dead_lettered_total", "stage" => name).increment(1);
            warn!(stage = name, record = %r.coordinates(), reason = %reason, "dead-lettered");
        }
        self.store_offsets(&batch);
        counter!("ese_stage_records_processed_total", "stage" => name)
            .increment(batch.items.len() as u64);
        histogram!("ese_stage_batch_duration_seconds", "stage" => name)
            .record(started.elapsed().as_secs_f64());
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (r, _) in batch.records() {
            if let Some(t) = r
                .header(RECEIVED_AT_HEADER)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<i64>().ok())
            {
                histogram!("ese_pipeline_end_to_end_seconds", "stage" => name)
                    .record((now_ms - t).max(0) as f64 / 1000.0);
            }
        }
        Ok(())
    }

    async fn decode_retrying(
        &self,
        record: &InRecord,
        first: String,
    ) -> anyhow::Result<Option<S::Input>> {
        let mut reason = first;
        let mut attempt = 0u32;
        loop {
            if !self.backoff(attempt, &reason).await? {
                return Ok(None);
            }
            attempt += 1;
            match self.stage.decode(record).await {
                Err(StageError::Transient(e)) => reason = e,
                Err(StageError::Fatal(e)) => {
                    anyhow::bail!(
                        "stage {}: decoding {}: {e}",
                        self.name(),
                        record.coordinates()
                    )
                }
                Ok(v) => return Ok(Some(v)),
                Err(StageError::Poison(e)) => {
                    anyhow::bail!(
                        "stage {}: decoding {} failed after a retry: {e}",
                        self.name(),
                        record.coordinates()
                    )
                }
            }
        }
    }

    /// Waits before retry `attempt`; false when shutting down, error when out of attempts.
    async fn backoff(&self, attempt: u32, reason: &str) -> anyhow::Result<bool> {
        let name = self.name();
        let policy = &self.pipeline.retry;
        if policy.max_attempts > 0 && attempt >= policy.max_attempts {
            anyhow::bail!("stage {name}: giving up after {attempt} attempts: {reason}");
        }
        counter!("ese_stage_retries_total", "stage" => name).increment(1);
        let base = policy.initial_backoff.as_millis() as u64;
        let cap = policy.max_backoff.as_millis() as u64;
        let exp = base.saturating_mul(1u64 << attempt.min(20)).min(cap).max(2);
        let wait = rand::rng().random_range(exp / 2..=exp);
        warn!(stage = name, attempt, wait_ms = wait, error = %reason, "transient error, retrying batch");
        tokio::select! {
            _ = self.shutdown.cancelled() => Ok(false),
            _ = tokio::time::sleep(Duration::from_millis(wait)) => Ok(true),
        }
    }

    /// Drops records of partitions no longer owned (or re-assigned since).
    fn retain_owned(&self, batch: &mut Batch<S::Input>) {
        let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        let is_owned = |r: &InRecord, epoch: u64| owned.epoch(&r.topic, r.partition) == Some(epoch);
        let items = std::mem::take(&mut batch.items);
        let epochs = std::mem::take(&mut batch.epochs);
        for (item, epoch) in items.into_iter().zip(epochs) {
            if is_owned(&item.record, epoch) {
                batch.items.push(item);
                batch.epochs.push(epoch);
            }
        }
        batch.dead.retain(|(r, _, e)| is_owned(r, *e));
    }

    /// Applies the batch, retrying transient errors; a poison batch is split
    /// into single records so only the guilty ones reach the DLQ.
    async fn apply_retrying(
        &self,
        mut batch: Batch<S::Input>,
    ) -> anyhow::Result<(Batch<S::Input>, Collector, Attempt)> {
        let name = self.name();
        let mut attempt = 0u32;
        loop {
            match self.apply(&batch).await {
                Ok(owed) => return Ok((batch, owed, Attempt::Done)),
                Err(StageError::Fatal(e)) => anyhow::bail!("stage {name}: {e}"),
                Err(StageError::Transient(e)) => {
                    counter!("ese_stage_records_failed_total", "stage" => name, "kind" => "transient")
                        .increment(batch.len() as u64);
                    if !self.backoff(attempt, &e).await? {
                        return Ok((batch, Collector::default(), Attempt::Abandoned));
                    }
                    attempt += 1;
                    self.retain_owned(&mut batch);
                    if batch.len() == 0 {
                        return Ok((batch, Collector::default(), Attempt::Abandoned));
                    }
                }
                Err(StageError::Poison(e)) if batch.items.len() <= 1 => {
                    counter!("ese_stage_records_failed_total", "stage" => name, "kind" => "poison")
                        .increment(batch.items.len() as u64);
                    batch.kill_all(&e);
                }
                Err(StageError::Poison(e)) => {
                    debug!(stage = name, error = %e, "poison in batch, retrying record by record");
                    let mut done = Batch::new();
                    let mut owed = Collector::default();
                    for single in batch.singles() {
                        // One level deep: a single record never splits again.
                        match Box::pin(self.apply_retrying(single)).await? {
                            (b, o, Attempt::Done) => {
                                owed.append(o, done.items.len());
                                done.absorb(b);
                            }
                            (_, _, Attempt::Abandoned) => {
                                return Ok((done, Collector::default(), Attempt::Abandoned));
                            }
                        }
                    }
                    return Ok((done, owed, Attempt::Done));
                }
            }
        }
    }

    /// One attempt: transaction, stage effects, commit. Commit comes first:
    /// a record on an output topic then always finds its source's effects
    /// committed, and a crash before the acknowledgements replays the batch,
    /// which changes nothing and emits the outputs again.
    async fn apply(&self, batch: &Batch<S::Input>) -> Result<Collector, StageError> {
        let name = self.name();
        let t = Instant::now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let t = phase_done(name, "begin", t);
        let mut out = Collector::default();
        if !batch.items.is_empty() {
            self.stage.process(&tx, &batch.items, &mut out).await?;
        }
        let t = phase_done(name, "process", t);
        tx.commit().await?;
        phase_done(name, "commit", t);
        Ok(out)
    }

    async fn produce(
        &self,
        outputs: &[OutRecord],
        dead: &[(&InRecord, &str)],
    ) -> Result<(), StageError> {
        let name = self.name();
        let failed_at = chrono::Utc::now().to_rfc3339();
        let mut records = Vec::with_capacity(outputs.len() + dead.len());
        for o in outputs {
            records.push(
                FutureRecord::<[u8], [u8]>::to(&o.topic)
                    .key(o.key.as_slice())
                    .payload(o.payload.as_slice())
                    .headers(to_headers(
                        o.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                    )),
            );
        }
        for (r, reason) in dead {
            let partition = r.partition.to_string();
            let offset = r.offset.to_string();
            let ours = [
                ("ese.error", reason.as_bytes()),
                ("ese.stage", name.as_bytes()),
                ("ese.source.topic", r.topic.as_bytes()),
                ("ese.source.partition", partition.as_bytes()),
                ("ese.source.offset", offset.as_bytes()),
                ("ese.failed-at", failed_at.as_bytes()),
            ];
            let headers = to_headers(
                r.headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_slice()))
                    .chain(ours),
            );
            let mut rec = FutureRecord::<[u8], [u8]>::to(&self.pipeline.dlq).headers(headers);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(p) = &r.payload {
                rec = rec.payload(p.as_slice());
            }
            records.push(rec);
        }
        let n = records.len();
        if let Err(e) = self.producer.send_all(records, self.produce_timeout).await {
            let text = format!("producing {n} records: {e}");
            return Err(if crate::kafka::is_transient(&e) {
                StageError::Transient(text)
            } else {
                StageError::Fatal(text)
            });
        }
        counter!("ese_stage_records_out_total", "stage" => name).increment(outputs.len() as u64);
        Ok(())
    }

    /// Stores, per partition, the highest offset of the batch — only for
    /// partitions still owned under the epoch the records were fetched in.
    fn store_offsets(&self, batch: &Batch<S::Input>) {
        let mut highest: HashMap<(&str, i32), (i64, u64)> = HashMap::new();
        for (r, epoch) in batch.records() {
            let slot = highest
                .entry((r.topic.as_str(), r.partition))
                .or_insert((r.offset, epoch));
            if r.offset >= slot.0 {
                *slot = (r.offset, epoch);
            }
        }
        let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        for ((topic, partition), (offset, epoch)) in highest {
            if owned.epoch(topic, partition) != Some(epoch) {
                debug!(
                    stage = self.name(),
                    topic, partition, "partition no longer owned; offset not stored"
                );
                continue;
            }
            if let Err(e) = self.consumer.store_offset(topic, partition, offset) {
                warn!(stage = self.name(), topic, partition, offset, error = %e, "offset not stored");
            }
        }
    }
}

/// Records the time since `since` as `phase` of a batch of `stage`
/// (`ese_stage_phase_seconds`); returns now.
fn phase_done(stage: &'static str, phase: &'static str, since: Instant) -> Instant {
    let now = Instant::now();
    histogram!("ese_stage_phase_seconds", "stage" => stage, "phase" => phase)
        .record((now - since).as_secs_f64());
    now
}

fn to_headers<'a>(pairs: impl Iterator<Item = (&'a str, &'a [u8])>) -> OwnedHeaders {
    pairs.fold(OwnedHeaders::new(), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    })
}
