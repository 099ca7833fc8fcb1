//! The engine's producer: idempotent, `acks=all`, recreated after a fatal error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::ToBytes;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use tracing::warn;

use super::client_config;
use crate::config::KafkaConfig;

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
