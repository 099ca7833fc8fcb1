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

mod collector;
mod worker;

pub use collector::{Collector, InRecord, Item, OutRecord, StageError};

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Pool, Transaction};
use metrics::{counter, gauge};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
    stream_consumer::StreamPartitionQueue,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::codec::Codec;
use crate::config::{Pipeline, Settings};
use crate::records::Record;

/// Header carrying the time (ms since the epoch) the bridge received a webhook;
/// the runner turns it into the end-to-end latency histogram.
pub const RECEIVED_AT_HEADER: &str = "ese.received-at";

/// The headers of a dead letter, each naming why and where it came from.
pub mod dlq_headers {
    /// Why the record is poison.
    pub const ERROR: &str = "ese.error";
    /// The stage that refused it.
    pub const STAGE: &str = "ese.stage";
    pub const SOURCE_TOPIC: &str = "ese.source.topic";
    pub const SOURCE_PARTITION: &str = "ese.source.partition";
    pub const SOURCE_OFFSET: &str = "ese.source.offset";
    /// RFC 3339.
    pub const FAILED_AT: &str = "ese.failed-at";
    /// On a record `ese dlq replay` put back: `DLQ[partition]@offset`.
    pub const REPLAYED_FROM: &str = "ese.replayed-from";
    /// The prefix of every header the engine writes.
    pub const PREFIX: &str = "ese.";
}

/// A stage: its domain logic and SQL, nothing of Kafka. The runner decodes
/// every record into [`Stage::Input`] (undecodable ones go to the DLQ) and
/// calls [`Stage::process`] with a batch inside one transaction.
pub trait Stage: Send + Sync + 'static {
    /// The record type on the stage's input topics.
    type Input: Record + Send + Sync + 'static;

    /// Applies `batch` inside `tx` and hands outputs and poison records to
    /// `out`. Outputs must follow from the input and committed state, not
    /// from whether this attempt changed a row, so a replayed record
    /// produces them again.
    fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<Self::Input>],
        out: &mut Collector,
    ) -> impl Future<Output = Result<(), StageError>> + Send;

    /// Called after every rebalance with the partitions this process now owns.
    fn assigned(&self, _owned: &[(String, i32)]) {}
}

/// What every stage of a process is built from; cheap to clone.
#[derive(Clone)]
pub struct Deps {
    pub settings: Settings,
    pub pool: Pool,
    pub producer: crate::kafka::Producer,
    pub codec: Codec,
}

impl Deps {
    /// Builds the clients every stage of a process shares.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        // Metrics recorded from here on are kept, whenever `/metrics` opens.
        crate::metrics::handle();
        Ok(Self {
            settings: settings.clone(),
            pool: crate::db::pool(&settings.database)?,
            producer: crate::kafka::Producer::new(&settings.kafka)?,
            codec: Codec::new(&settings.schema_registry)?,
        })
    }

    /// Runs `stage` as stage `name` (its pipeline `pipelines/<name>.toml`)
    /// until `shutdown` (then drains and returns `Ok`) or a fatal error.
    pub async fn consume<S: Stage>(
        &self,
        name: &'static str,
        stage: S,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let pipeline = self.settings.pipeline(name)?.clone();
        run(name, Arc::new(stage), pipeline, self.clone(), shutdown).await
    }

    /// The topic of output `key` of `stage`'s pipeline, or an error naming both.
    pub fn output(&self, stage: &str, key: &str) -> anyhow::Result<String> {
        self.settings
            .pipeline(stage)?
            .outputs
            .get(key)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("pipelines.{stage}.outputs.{key} is not set"))
    }
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
                gauge!(crate::metrics::names::KAFKA_CONSUMER_LAG_RECORDS, "stage" => self.stage, "topic" => topic.clone(), "partition" => p.to_string())
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
    name: &'static str,
    stage: Arc<S>,
    pipeline: Pipeline,
    /// Output name → topic, for every batch's [`Collector`].
    outputs_of: Arc<std::collections::BTreeMap<String, String>>,
    deps: Deps,
    consumer: Arc<StreamConsumer<RunnerContext>>,
    owned: Owned,
    shutdown: CancellationToken,
    /// Records finished (and their offsets stored) after the stop began.
    drained: std::sync::atomic::AtomicU64,
}

/// Runs `stage` until `shutdown` is cancelled (then drains and returns `Ok`)
/// or a fatal error (returned).
async fn run<S: Stage>(
    name: &'static str,
    stage: Arc<S>,
    pipeline: Pipeline,
    deps: Deps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
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
    let mut config = crate::kafka::consumer_config(&deps.settings.kafka, &pipeline.group_id)?;
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
        name,
        stage,
        outputs_of: Arc::new(pipeline.outputs.clone()),
        pipeline,
        deps,
        consumer: consumer.clone(),
        owned: owned.clone(),
        shutdown: shutdown.clone(),
        drained: Default::default(),
    });
    let mut senders = Vec::with_capacity(workers_n);
    let mut workers = JoinSet::new();
    for _ in 0..workers_n {
        let (tx, rx) = mpsc::channel::<Dispatched>(2 * batch_size);
        senders.push(tx);
        let shared = shared.clone();
        workers.spawn(async move { worker::run(shared, rx).await });
    }
    let worker_of = |partition: i32| partition.unsigned_abs() as usize % workers_n;
    // One handle, not a registry lookup per record.
    let consumed = counter!(crate::metrics::names::STAGE_RECORDS_CONSUMED_TOTAL, "stage" => name);
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
    let drained = shared.drained.load(std::sync::atomic::Ordering::Relaxed);
    // The final commit, leaving the group and closing the consumer block
    // until the broker answers; off the async workers, because the broker
    // may be the embedded one on this very runtime (two workers blocked
    // here stopped it answering, and `ese up` never exited).
    drop(shared);
    let closed = tokio::task::spawn_blocking(move || {
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            debug!(stage = name, error = %e, "final commit");
        }
        consumer.unsubscribe();
        drop(consumer);
    })
    .await;
    if let Err(e) = closed {
        fatal.get_or_insert(anyhow::anyhow!("closing the consumer: {e}"));
    }
    match fatal {
        Some(e) => {
            error!(stage = name, error = %e, "stage stopped");
            Err(e)
        }
        None => {
            info!(
                stage = name,
                drained,
                "stage stopped cleanly: offsets committed, {drained} records finished after the stop"
            );
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
            counter!(crate::metrics::names::KAFKA_CONSUME_ERRORS_TOTAL, "stage" => name)
                .increment(1);
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
