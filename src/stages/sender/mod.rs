//! `sender`: send records → provider calls, at most once per message.
//!
//! At send time, per message: not QUEUED → nothing (already sent, final, or
//! claimed); opted out → FAILED with a suppression reason, no call (the
//! opt-out confirmation excepted); campaign paused (or not yet running) →
//! held; cancelled or completed → FAILED; a retry delay or quiet hours in the
//! recipient's time zone → held until then. Held messages wait in Postgres
//! (`parked_until`) and the [`Pump`] puts them back on `sends` when due.
//!
//! The rest is paced by the campaign's and the sender number's governor
//! limiters — each process takes its share of partitions of `sends` as its
//! share of every limit, so the limits hold across the group — then claimed
//! (QUEUED → SENDING, committed) right before the call. The answer: SENT with the SID,
//! committed right after each chunk of calls
//! (and receipts parked for that SID applied); transient errors → QUEUED
//! again with a retry record on the next delay topic, FAILED after the last;
//! permanent → FAILED with the code (21610 also opts the user out). No answer
//! (timeout) leaves the row SENDING; the pump's reconciler looks it up at the
//! provider after `reconcile-after` and sends it again only if the provider
//! never got it; no call starts later than `reconcile-after − timeout − 1s`
//! after its claim, so the reconciler never races a call in flight.

mod decide;
mod limits;
mod pump;
mod sql;

pub use decide::quiet_until;
pub use limits::Limits;
pub use pump::Pump;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use uuid::Uuid;

use chrono::{DateTime, NaiveTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use futures::StreamExt;
use futures::future::BoxFuture;
use metrics::{counter, histogram};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{SenderConfig, StopScope};
use crate::db::calls::{ConsentDecision, apply_consent};
use crate::model::ConsentState;
use crate::phone::Normalizer;
use crate::records::SendRequest;
use crate::runner::{Collector, Deps, Item, Stage, StageError};
use crate::twilio::{Outcome, Provider};
use decide::{Decision, Msg};
use sql::*;

/// The stage's name: its pipeline is `pipelines/sender.toml`.
const NAME: &str = "sender";

/// The stage and its [`Pump`], until `shutdown`.
pub fn start(deps: Deps, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let settings = &deps.settings;
        let sends_topic = settings.topic("sends")?.to_string();
        let provider = Provider {
            http: crate::http::client_builder()
                .build()
                .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?,
            cfg: settings.provider.clone(),
            creds: crate::twilio::Credentials::from_env()?,
            status_callback: format!(
                "{}/webhooks/twilio/status",
                settings.bridge.public_url.trim_end_matches('/')
            ),
        };
        let default_tz = settings.sender.default_timezone.parse().map_err(|_| {
            anyhow::anyhow!(
                "sender.default-timezone: {:?} is not an IANA time zone",
                settings.sender.default_timezone
            )
        })?;
        let partitions = crate::kafka::TopicReader::new(&settings.kafka)?
            .end_offsets(&sends_topic)
            .await?
            .len();
        let pump = Pump {
            pool: deps.pool.clone(),
            producer: deps.producer.clone(),
            codec: deps.codec.clone(),
            provider: provider.clone(),
            sends_topic: sends_topic.clone(),
            interval: settings.sender.pump_interval,
            reconcile_after: settings.sender.reconcile_after,
            produce_timeout: settings.kafka.produce_timeout,
            whatsapp_fallback: !settings.sender.whatsapp_fallback_content_sid.is_empty(),
        };
        let stage = Sender {
            pool: deps.pool.clone(),
            provider,
            cfg: settings.sender.clone(),
            phones: Normalizer::new(&settings.phone.default_region),
            default_tz,
            limits: Limits::new(&sends_topic, partitions, &settings.sender),
            stop_scope: settings.consent.stop_scope,
        };
        let stop = shutdown.child_token();
        let pumping = tokio::spawn(pump.run(stop.clone()));
        let result = deps.consume(NAME, stage, shutdown).await;
        stop.cancel();
        let _ = pumping.await;
        result
    })
}

/// The stage.
pub struct Sender {
    pub pool: Pool,
    pub provider: Provider,
    pub cfg: SenderConfig,
    pub phones: Normalizer,
    pub default_tz: chrono_tz::Tz,
    pub limits: Limits,
    /// Whose consent a provider opt-out (21610) withdraws.
    pub stop_scope: StopScope,
}

impl Stage for Sender {
    type Input = SendRequest;

    fn assigned(&self, owned: &[(String, i32)]) {
        self.limits.assigned(owned);
    }

    /// Lookup → decide → park → dispatch → record.
    async fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<SendRequest>],
        out: &mut Collector,
    ) -> Result<(), StageError> {
        let now = Utc::now();
        let sends = unique(batch);
        let mut msgs = self.lookup(tx, &sends).await?;
        let plan = self.plan(&sends, &msgs, now, out);
        self.park(tx, &plan.park).await?;
        let work = plan
            .go
            .into_iter()
            .filter_map(|(n, id)| Some((n, msgs.remove(&id)?)))
            .collect();
        let attempts = self.dispatch(work).await;
        self.record(tx, batch, attempts, plan.fail, now, out).await
    }
}

/// The batch's send records, one per message (a redelivery may repeat
/// one), with their index in the batch.
fn unique(batch: &[Item<SendRequest>]) -> Vec<(usize, &SendRequest)> {
    let mut seen = HashSet::new();
    batch
        .iter()
        .enumerate()
        .filter(|(_, i)| seen.insert(i.value.message_id))
        .map(|(n, i)| (n, &i.value))
        .collect()
}

/// What the batch's decisions came to.
#[derive(Default)]
struct Plan {
    /// (message, why) to fail without a call.
    fail: Vec<(Uuid, Option<i32>, String)>,
    /// (message, until, why) to hold.
    park: Vec<(Uuid, DateTime<Utc>, &'static str)>,
    /// (batch index, message) to send now.
    go: Vec<(usize, Uuid)>,
}

/// One message sent (or tried): its batch index, the message, and the
/// outcome; `None` when it was not claimed.
type Attempt = (usize, Msg, Option<Outcome>);

impl Sender {
    /// The batch's messages as the database has them now.
    async fn lookup(
        &self,
        tx: &Transaction<'_>,
        sends: &[(usize, &SendRequest)],
    ) -> Result<HashMap<Uuid, Msg>, StageError> {
        let ids: Vec<Uuid> = sends.iter().map(|(_, s)| s.message_id).collect();
        let stmt = tx.prepare_cached(LOOKUP).await?;
        let mut msgs = HashMap::new();
        for r in tx.query(&stmt, &[&ids]).await? {
            let quiet = match (
                r.get::<_, Option<NaiveTime>>(9),
                r.get::<_, Option<NaiveTime>>(10),
            ) {
                (Some(s), Some(e)) => Some((s, e)),
                _ => None,
            };
            let m = Msg {
                id: r.get(0),
                status: r.get(1),
                phone: r.get(2),
                channel: r.get(3),
                body: r.get(4),
                retries: r.get(5),
                campaign: r.get(6),
                campaign_status: r.get(7),
                rate: r.get(8),
                quiet,
                consent: r.get(11),
                timezone: r.get(12),
                kind: r.get(13),
                content: r.get::<_, Option<String>>(14).map(|sid| {
                    (
                        sid,
                        r.get::<_, Option<serde_json::Value>>(15)
                            .unwrap_or_default(),
                    )
                }),
                last_whatsapp: r.get(16),
            };
            msgs.insert(m.id, m);
        }
        Ok(msgs)
    }

    /// Decides every message; a send record for no message is poison.
    fn plan(
        &self,
        sends: &[(usize, &SendRequest)],
        msgs: &HashMap<Uuid, Msg>,
        now: DateTime<Utc>,
        out: &mut Collector,
    ) -> Plan {
        let mut plan = Plan::default();
        for (n, s) in sends {
            let Some(m) = msgs.get(&s.message_id) else {
                out.dead_letter(*n, format!("message {} does not exist", s.message_id));
                continue;
            };
            match self.decide(m, s.not_before, now) {
                Decision::Nothing => {
                    counter!(crate::metrics::names::SENDER_SENDS_TOTAL, "outcome" => "skipped")
                        .increment(1)
                }
                Decision::Fail(reason) => plan.fail.push((m.id, None, reason.to_string())),
                Decision::Park(until, reason) => plan.park.push((m.id, until, reason)),
                Decision::Send => plan.go.push((*n, m.id)),
            }
        }
        plan
    }

    /// Holds messages until their time (the pump puts them back).
    async fn park(
        &self,
        tx: &Transaction<'_>,
        park: &[(Uuid, DateTime<Utc>, &'static str)],
    ) -> Result<(), StageError> {
        if park.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = park.iter().map(|p| p.0).collect();
        let ts: Vec<DateTime<Utc>> = park.iter().map(|p| p.1).collect();
        let rs: Vec<&str> = park.iter().map(|p| p.2).collect();
        tx.execute(PARK, &[&ids, &ts, &rs]).await?;
        for p in park {
            counter!(crate::metrics::names::SENDER_HELD_TOTAL, "reason" => p.2).increment(1);
        }
        Ok(())
    }

    /// Claims, paces and calls, in chunks of about 100 ms of sends at the
    /// slowest campaign's or channel's rate (one commit per chunk, not per message), two
    /// chunks ahead at most: a pause stops sends within ~200 ms.
    async fn dispatch(&self, work: Vec<(usize, Msg)>) -> Vec<Attempt> {
        let slowest = work
            .iter()
            .flat_map(|(_, m)| {
                let channel = self.limits.channel_rate(m.channel).map(|r| r as i32);
                [m.rate, channel]
            })
            .flatten()
            .min()
            .unwrap_or(i32::MAX);
        let concurrency = self.provider.cfg.concurrency.max(1);
        // A chunk's calls land together, up to a chunk after their permits:
        // at most half the burst (the limiters keep the other half), or
        // 10 ms of sends at high rates (then a second passes the limit by
        // at most 1%).
        let chunk = if slowest == i32::MAX {
            concurrency
        } else {
            let slowest = slowest.max(1) as usize;
            (slowest / 10)
                .clamp(1, self.limits.max_chunk().max(slowest / 100))
                .min(concurrency)
        };
        let mut chunks = Vec::new();
        let mut rest = work.into_iter().peekable();
        while rest.peek().is_some() {
            chunks.push(rest.by_ref().take(chunk).collect::<Vec<_>>());
        }
        futures::stream::iter(chunks)
            .map(|c| self.call_chunk(c))
            .buffer_unordered(2)
            .flat_map(futures::stream::iter)
            .collect()
            .await
    }

    /// Writes down what the calls came to: unclaimed messages held again,
    /// transient failures re-queued with a record on the next retry topic
    /// (FAILED after the last), permanent ones FAILED (21610 also opts the
    /// person out).
    async fn record(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<SendRequest>],
        attempts: Vec<Attempt>,
        mut fail: Vec<(Uuid, Option<i32>, String)>,
        now: DateTime<Utc>,
        out: &mut Collector,
    ) -> Result<(), StageError> {
        let mut unclaimed = Vec::new();
        let mut requeue = Vec::new();
        let mut opt_outs = Vec::new();
        for (n, m, outcome) in attempts {
            let item = &batch[n];
            let Some(outcome) = outcome else {
                unclaimed.push(m.id);
                continue;
            };
            let label = match &outcome {
                Outcome::Sent(_) => "sent",
                Outcome::Transient(..) => "transient",
                Outcome::Permanent(..) => "permanent",
                Outcome::Unknown(_) => "unknown",
            };
            counter!(crate::metrics::names::SENDER_SENDS_TOTAL, "outcome" => label).increment(1);
            match outcome {
                // Recorded by `call_chunk` right after the call.
                Outcome::Sent(_) => {}
                Outcome::Transient(code, why) if (m.retries as u32) < self.cfg.max_retries => {
                    let attempt = m.retries as usize + 1;
                    let delay = self
                        .cfg
                        .retry_delays
                        .get(attempt - 1)
                        .map(|d| **d)
                        .unwrap_or(Duration::from_secs(60));
                    let retry = SendRequest {
                        attempt: attempt as i32,
                        not_before: Some((now + delay).timestamp_millis()),
                        ..item.value.clone()
                    };
                    let output = format!("retry-{attempt}");
                    if let Err(e) = out.topic(&output) {
                        fail.push((m.id, code, format!("{e}: {why}")));
                        continue;
                    }
                    out.emit(&item.record, &output, m.phone.as_bytes(), &retry)
                        .await?;
                    requeue.push((m.id, code, why));
                }
                Outcome::Transient(code, why) => fail.push((
                    m.id,
                    code,
                    format!("gave up after {} retries: {why}", m.retries),
                )),
                Outcome::Permanent(code, why) => {
                    if code == Some(21610) {
                        opt_outs.push((
                            m.phone.clone(),
                            format!("provider-21610:{}", m.id),
                            m.channel,
                        ));
                    }
                    fail.push((m.id, code, why));
                }
                Outcome::Unknown(why) => {
                    warn!(message = %m.id, error = %why, "provider outcome unknown; left SENDING for reconciliation");
                }
            }
        }
        if !unclaimed.is_empty() {
            // Paused or opted out meanwhile (decided again when the pump puts
            // it back), or taken by another sender (the QUEUED guard skips it).
            let ts = vec![now; unclaimed.len()];
            let rs = vec!["campaign not running or consent withdrawn"; unclaimed.len()];
            tx.execute(PARK, &[&unclaimed, &ts, &rs]).await?;
        }
        if !requeue.is_empty() {
            let ids: Vec<Uuid> = requeue.iter().map(|r| r.0).collect();
            let codes: Vec<Option<i32>> = requeue.iter().map(|r| r.1).collect();
            let why: Vec<&str> = requeue.iter().map(|r| r.2.as_str()).collect();
            tx.execute(REQUEUE, &[&ids, &codes, &why]).await?;
        }
        if !fail.is_empty() {
            let ids: Vec<Uuid> = fail.iter().map(|f| f.0).collect();
            let codes: Vec<Option<i32>> = fail.iter().map(|f| f.1).collect();
            let why: Vec<&str> = fail.iter().map(|f| f.2.as_str()).collect();
            tx.execute(FAIL, &[&ids, &codes, &why]).await?;
            let unreachable = crate::twilio::errors::not_on_channel();
            tx.execute(crate::db::calls::MARK_UNREACHABLE, &[&ids, &unreachable])
                .await?;
        }
        apply_consent(
            tx,
            opt_outs
                .iter()
                .map(|(phone, event, channel)| ConsentDecision {
                    phone,
                    channel: (self.stop_scope == StopScope::Channel).then_some(*channel),
                    state: ConsentState::OptOut,
                    at: now,
                    source: "provider",
                    keyword: None,
                    event_id: event,
                }),
        )
        .await?;
        Ok(())
    }
}

impl Sender {
    /// Paces the chunk, then claims its rows (committed: a crash after this
    /// never re-sends) and calls the provider for each at once. Pacing comes
    /// first so a claim is followed by its call right away: the reconciler
    /// takes a row left SENDING longer than `reconcile-after` for one whose
    /// call never happened, so no call may start that late — one that would
    /// is not made, and the reconciler queues it again. The calls of a chunk
    /// land together, one chunk after their permits at most; a limited
    /// chunk is therefore at most half the burst (or 10 ms of sends at high
    /// rates), and the limiters keep the other half, so no second at the
    /// provider passes the limit plus the burst (by 1% at most above
    /// 100 × half the burst per second). `None`: not claimed
    /// (campaign paused or recipient opted out meanwhile, or taken by another
    /// sender).
    async fn call_chunk(&self, chunk: Vec<(usize, Msg)>) -> Vec<Attempt> {
        for (_, m) in &chunk {
            self.pace(m).await;
        }
        let ids: Vec<Uuid> = chunk.iter().map(|(_, m)| m.id).collect();
        // Taken before the claim's round trip, so it errs on the early side.
        let claimed_at = Instant::now();
        let latest_start = self
            .cfg
            .reconcile_after
            .saturating_sub(self.provider.cfg.timeout + Duration::from_secs(1));
        let claimed = match self.claim(&ids).await {
            Ok(c) => c,
            Err(e) => {
                let why = format!("claim: {e}");
                return chunk
                    .into_iter()
                    .map(|(n, m)| (n, m, Some(Outcome::Transient(None, why.clone()))))
                    .collect();
            }
        };
        let claimed = &claimed;
        let calls = chunk.into_iter().map(|(n, m)| async move {
            if !claimed.contains(&m.id) {
                return (n, m, None);
            }
            if claimed_at.elapsed() > latest_start {
                let why = "claimed too long ago to call safely; not called".to_string();
                return (n, m, Some(Outcome::Unknown(why)));
            }
            let outcome = self
                .provider
                .send(m.channel, &m.phone, &self.payload(&m))
                .await;
            (n, m, Some(outcome))
        });
        let results = futures::future::join_all(calls).await;
        let sent: Vec<(Uuid, &str)> = results
            .iter()
            .filter_map(|(_, m, o)| match o {
                Some(Outcome::Sent(sid)) => Some((m.id, sid.as_str())),
                _ => None,
            })
            .collect();
        if let Err(e) = self.mark_sent(&sent).await {
            // Left SENDING: the pump's reconciliation finds them at the provider.
            warn!(error = %e, sends = sent.len(), "recording sends failed; left for reconciliation");
        }
        results
    }

    /// Records sends the provider accepted and links the status callbacks
    /// that beat them, outside the batch transaction: a callback stored
    /// between an in-transaction link and its commit would find no message
    /// and stay parked. Committed first, then linked, so every callback is
    /// linked either here or by the receipts stage.
    async fn mark_sent(&self, sent: &[(Uuid, &str)]) -> anyhow::Result<()> {
        if sent.is_empty() {
            return Ok(());
        }
        let client = self.pool.get().await?;
        let ids: Vec<Uuid> = sent.iter().map(|s| s.0).collect();
        let sids: Vec<&str> = sent.iter().map(|s| s.1).collect();
        client
            .execute(&client.prepare_cached(SENT).await?, &[&ids, &sids])
            .await?;
        fold_beaten(&client, &sids).await
    }

    async fn claim(&self, ids: &[Uuid]) -> anyhow::Result<HashSet<Uuid>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(CLAIM).await?;
        let rows = client.query(&stmt, &[&ids]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Waits for the campaign's and the sender's limiters on its channel.
    async fn pace(&self, m: &Msg) {
        let started = Instant::now();
        if let (Some(id), Some(rate)) = (m.campaign, m.rate) {
            self.limits
                .campaign(id, rate.max(1) as u32)
                .until_ready()
                .await;
        }
        if let Some(g) = self.limits.channel(m.channel) {
            g.until_ready().await;
        }
        histogram!(crate::metrics::names::SENDER_RATE_LIMIT_WAIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
    }
}

/// Folds the status callbacks that beat `sids`, once those SIDs are
/// committed on their messages (the sender's answer, the pump's
/// reconciliation). Nearly always none is stored yet; the fold (planned
/// anew on every call, ~1.3 ms) runs only when one is.
pub(super) async fn fold_beaten(
    client: &deadpool_postgres::Client,
    sids: &[&str],
) -> anyhow::Result<()> {
    let beaten: bool = client
        .query_one(&client.prepare_cached(RECEIPTS_STORED).await?, &[&sids])
        .await?
        .get(0);
    if beaten {
        client.query(APPLY_RECEIPTS, &[&sids]).await?;
    }
    Ok(())
}
