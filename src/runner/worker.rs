//! One worker of a stage: gathers a batch, decodes it, applies it in one
//! transaction (split record by record when poison is in it), produces its
//! outputs and dead letters, and stores its offsets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use rand::Rng;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    Collector, Dispatched, InRecord, Item, OutRecord, RECEIVED_AT_HEADER, Shared, Stage,
    StageError, dlq_headers,
};

pub(super) async fn run<S: Stage>(
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
        self.name
    }

    /// Decodes one record into the stage's input type.
    async fn decode(&self, record: &InRecord) -> Result<S::Input, StageError> {
        Ok(self.deps.codec.decode(record.payload()).await?)
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
            let decoded = match self.decode(&d.record).await {
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
        histogram!(crate::metrics::names::STAGE_BATCH_SIZE_RECORDS, "stage" => name)
            .record(batch.len() as f64);

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
            counter!(crate::metrics::names::STAGE_RECORDS_DEAD_LETTERED_TOTAL, "stage" => name)
                .increment(1);
            warn!(stage = name, record = %r.coordinates(), reason = %reason, "dead-lettered");
        }
        self.store_offsets(&batch);
        if self.shutdown.is_cancelled() {
            self.drained
                .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        counter!(crate::metrics::names::STAGE_RECORDS_PROCESSED_TOTAL, "stage" => name)
            .increment(batch.items.len() as u64);
        histogram!(crate::metrics::names::STAGE_BATCH_DURATION_SECONDS, "stage" => name)
            .record(started.elapsed().as_secs_f64());
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (r, _) in batch.records() {
            if let Some(t) = r
                .header(RECEIVED_AT_HEADER)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<i64>().ok())
            {
                histogram!(crate::metrics::names::PIPELINE_END_TO_END_SECONDS, "stage" => name)
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
            match self.decode(record).await {
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
        counter!(crate::metrics::names::STAGE_RETRIES_TOTAL, "stage" => name).increment(1);
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
                    counter!(crate::metrics::names::STAGE_RECORDS_FAILED_TOTAL, "stage" => name, "kind" => "transient")
                        .increment(batch.len() as u64);
                    if !self.backoff(attempt, &e).await? {
                        return Ok((batch, self.collector(), Attempt::Abandoned));
                    }
                    attempt += 1;
                    self.retain_owned(&mut batch);
                    if batch.len() == 0 {
                        return Ok((batch, self.collector(), Attempt::Abandoned));
                    }
                }
                Err(StageError::Poison(e)) if batch.items.len() <= 1 => {
                    counter!(crate::metrics::names::STAGE_RECORDS_FAILED_TOTAL, "stage" => name, "kind" => "poison")
                        .increment(batch.items.len() as u64);
                    batch.kill_all(&e);
                }
                Err(StageError::Poison(e)) => {
                    debug!(stage = name, error = %e, "poison in batch, retrying record by record");
                    let mut done = Batch::new();
                    let mut owed = self.collector();
                    for single in batch.singles() {
                        // One level deep: a single record never splits again.
                        match Box::pin(self.apply_retrying(single)).await? {
                            (b, o, Attempt::Done) => {
                                owed.append(o, done.items.len());
                                done.absorb(b);
                            }
                            (_, _, Attempt::Abandoned) => {
                                return Ok((done, self.collector(), Attempt::Abandoned));
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
    /// An empty collector for one batch's outputs.
    fn collector(&self) -> Collector {
        Collector::new(self.deps.codec.clone(), self.outputs_of.clone())
    }

    async fn apply(&self, batch: &Batch<S::Input>) -> Result<Collector, StageError> {
        let name = self.name();
        let t = Instant::now();
        let mut client = self.deps.pool.get().await?;
        let tx = client.transaction().await?;
        let t = phase_done(name, "begin", t);
        let mut out = self.collector();
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
                (dlq_headers::ERROR, reason.as_bytes()),
                (dlq_headers::STAGE, name.as_bytes()),
                (dlq_headers::SOURCE_TOPIC, r.topic.as_bytes()),
                (dlq_headers::SOURCE_PARTITION, partition.as_bytes()),
                (dlq_headers::SOURCE_OFFSET, offset.as_bytes()),
                (dlq_headers::FAILED_AT, failed_at.as_bytes()),
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
        if let Err(e) = self
            .deps
            .producer
            .send_all(records, self.deps.settings.kafka.produce_timeout)
            .await
        {
            let text = format!("producing {n} records: {e}");
            return Err(if crate::kafka::is_transient(&e) {
                StageError::Transient(text)
            } else {
                StageError::Fatal(text)
            });
        }
        counter!(crate::metrics::names::STAGE_RECORDS_OUT_TOTAL, "stage" => name)
            .increment(outputs.len() as u64);
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
    histogram!(crate::metrics::names::STAGE_PHASE_SECONDS, "stage" => stage, "phase" => phase)
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
