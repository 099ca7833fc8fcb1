//! `consent`: inbound messages → consent. Keywords (read as people write
//! them: `keywords`) opt a number out or in, by event time, so a
//! late-arriving older decision never undoes a newer one (`ese_apply_consent`,
//! `sql/functions/`); every decision is kept in `consent_events`, and so is
//! a mention that decides nothing (`UNCLEAR`). A number first seen here is
//! `UNKNOWN` until it opts in. Auto-replies (and clarifications, at most one
//! per number per `consent.clarify-interval`) become `messages` rows of
//! their kind, keyed by the inbound event, and go out on `sends`; decisions
//! that took effect go out on `consent.changes`.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use crate::config::{ConsentConfig, StopScope};
use crate::model::{ConsentState, SendKind};
use crate::records::{ConsentChange, InboundNormalized, SendRequest};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::runner::{Collector, Deps, InRecord, Item, Stage, StageError};

mod keywords;
pub use keywords::{Intent, Keywords, normalise};

/// Each person's interaction figures: their last message and how many they
/// sent (counted from the audit rows normalize wrote, so a replay counts
/// nothing twice).
const TOUCH_USERS: &str = "
INSERT INTO users AS u (phone_e164, last_message_received, consent_state, messages_received)
SELECT p, max(t), 'UNKNOWN', (SELECT count(*) FROM inbound_events i WHERE i.from_phone = x.p)
  FROM unnest($1::text[], $2::timestamptz[]) AS x(p, t) GROUP BY p
ON CONFLICT (phone_e164) DO UPDATE
   SET last_message_received = GREATEST(u.last_message_received, EXCLUDED.last_message_received),
       messages_received = EXCLUDED.messages_received
 WHERE u.last_message_received IS DISTINCT FROM GREATEST(u.last_message_received, EXCLUDED.last_message_received)
    OR u.messages_received <> EXCLUDED.messages_received";

/// Each person's last message per channel (on WhatsApp, their window); a
/// message there also says they can be reached there again.
const TOUCH_CHANNELS: &str = "
INSERT INTO user_channels AS uc (phone_number, channel, last_inbound_at)
SELECT p, c, max(t) FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS x(p, c, t)
 GROUP BY p, c ORDER BY p, c
ON CONFLICT (phone_number, channel) DO UPDATE
   SET last_inbound_at = GREATEST(uc.last_inbound_at, EXCLUDED.last_inbound_at),
       unreachable_at = NULL, unreachable_code = NULL
 WHERE uc.last_inbound_at IS DISTINCT FROM GREATEST(uc.last_inbound_at, EXCLUDED.last_inbound_at)
    OR uc.unreachable_at IS NOT NULL";

use crate::db::calls::{ConsentDecision, apply_consent};

const DECISIONS: &str = "
SELECT source_event_id, phone_number, old_state, new_state, applied, keyword, source, occurred_at, channel
  FROM consent_events WHERE source_event_id = ANY($1::text[])";

/// Consent in force at each message's time on its channel: the newest
/// decision at or before it (every channel's, or that channel's); before any
/// decision, the state the first one found (none: UNKNOWN); else the stored one.
const STATES_AT: &str = "
SELECT x.e, coalesce(
    (SELECT c.new_state FROM consent_events c
      WHERE c.phone_number = x.p AND c.occurred_at <= x.t AND c.new_state <> 'UNCLEAR'
        AND (c.channel IS NULL OR c.channel = x.c)
      ORDER BY c.occurred_at DESC, c.id DESC LIMIT 1),
    (SELECT coalesce(c.old_state, 'UNKNOWN') FROM consent_events c
      WHERE c.phone_number = x.p AND c.new_state <> 'UNCLEAR' AND (c.channel IS NULL OR c.channel = x.c)
      ORDER BY c.occurred_at, c.id LIMIT 1),
    (SELECT ese_consent_on(u.phone_e164, x.c, u.consent_state) FROM users u WHERE u.phone_e164 = x.p),
    'UNKNOWN')
  FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[]) AS x(p, t, e, c)";

/// A mention that decides nothing, kept for the audit trail.
const UNCLEAR: &str = "
INSERT INTO consent_events (phone_number, old_state, new_state, source, keyword, source_event_id, occurred_at, applied)
SELECT x.p, u.consent_state, 'UNCLEAR', 'keyword', x.k, x.e, x.t, false
  FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS x(p, k, e, t)
  LEFT JOIN users u ON u.phone_e164 = x.p
ON CONFLICT (source_event_id) DO NOTHING";

/// Numbers that got a clarification within the interval (seconds).
const CLARIFIED: &str = "
SELECT DISTINCT recipient_phone FROM messages
 WHERE kind = 'clarification' AND recipient_phone = ANY($1::text[])
   AND created_at > now() - make_interval(secs => $2::float8)";

const PROCESSED: &str = "
UPDATE inbound_events SET processing_status = 'PROCESSED', processed_at = now()
 WHERE event_id = ANY($1::uuid[]) AND processing_status = 'PENDING'";

const INSERT_REPLIES: &str = "
INSERT INTO messages (id, recipient_phone, channel, rendered_content, idempotency_key, kind)
SELECT x.id, x.p, x.c, x.b, x.k, x.kind
  FROM unnest($6::uuid[], $1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
       AS x(id, p, c, b, k, kind)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING";

/// Found by key; status compared so no index covers it (`sender::sql`).
const QUEUED_REPLIES: &str = "
SELECT id, recipient_phone, channel, rendered_content, idempotency_key, kind FROM messages
 WHERE idempotency_key = ANY($1::text[]) AND status || '' = 'QUEUED'";

/// The consent stage.
pub struct Consent {
    pub cfg: ConsentConfig,
    pub keywords: Keywords,
}

impl Consent {
    pub fn new(cfg: ConsentConfig) -> Self {
        Self {
            keywords: Keywords::new(&cfg),
            cfg,
        }
    }
}

/// The stage, until `shutdown`.
pub fn start(deps: Deps, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let cfg = deps.settings.consent.clone();
        deps.consume("consent", Consent::new(cfg), shutdown).await
    })
}

fn reply_key(event_id: &str) -> String {
    format!("reply:{event_id}")
}

impl Stage for Consent {
    type Input = InboundNormalized;

    async fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<InboundNormalized>],
        out: &mut Collector,
    ) -> Result<(), StageError> {
        // Outputs carry the tracing headers of the message they answer.
        let source: std::collections::HashMap<&str, &InRecord> = batch
            .iter()
            .map(|i| (i.value.event_id.as_str(), &i.record))
            .collect();
        let from = |event: &str| source.get(event).copied().unwrap_or(&batch[0].record);
        let mut live = Vec::with_capacity(batch.len());
        for (i, item) in batch.iter().enumerate() {
            let m = &item.value;
            let (Some(at), Ok(event_uuid)) = (
                DateTime::<Utc>::from_timestamp_millis(m.received_at),
                m.event_id.parse::<uuid::Uuid>(),
            ) else {
                out.dead_letter(
                    i,
                    format!(
                        "bad event_id {:?} or received_at {}",
                        m.event_id, m.received_at
                    ),
                );
                continue;
            };
            live.push((m, at, event_uuid, self.keywords.classify(&m.body)));
        }

        // Decisions: every channel's, or the one it came on (stop-scope).
        apply_consent(
            tx,
            live.iter().filter_map(|(m, at, _, intent)| {
                let (state, kw) = match intent {
                    Intent::OptOut(k) => (ConsentState::OptOut, k),
                    Intent::OptIn(k) => (ConsentState::OptIn, k),
                    _ => return None,
                };
                Some(ConsentDecision {
                    phone: &m.from,
                    channel: (self.cfg.stop_scope == StopScope::Channel).then_some(m.channel),
                    state,
                    at: *at,
                    source: "keyword",
                    keyword: Some(kw),
                    event_id: &m.event_id,
                })
            }),
        )
        .await?;

        // Every sender exists as a user (ordinary messages: opted in), with its
        // latest message time. After the decisions, so a new number's first
        // keyword decides its state.
        let phones: Vec<&str> = live.iter().map(|(m, ..)| m.from.as_str()).collect();
        let times: Vec<DateTime<Utc>> = live.iter().map(|(_, at, ..)| *at).collect();
        tx.execute(&tx.prepare_cached(TOUCH_USERS).await?, &[&phones, &times])
            .await?;
        let channels: Vec<&str> = live.iter().map(|(m, ..)| m.channel.as_str()).collect();
        tx.execute(
            &tx.prepare_cached(TOUCH_CHANNELS).await?,
            &[&phones, &channels, &times],
        )
        .await?;

        // Mentions that decide nothing, after the users exist.
        let unclear: Vec<_> = live
            .iter()
            .filter_map(|(m, at, _, intent)| match intent {
                Intent::Unclear(k) => Some((m.from.as_str(), k.as_str(), m.event_id.as_str(), *at)),
                _ => None,
            })
            .collect();
        if !unclear.is_empty() {
            let p: Vec<&str> = unclear.iter().map(|u| u.0).collect();
            let k: Vec<&str> = unclear.iter().map(|u| u.1).collect();
            let e: Vec<&str> = unclear.iter().map(|u| u.2).collect();
            let t: Vec<DateTime<Utc>> = unclear.iter().map(|u| u.3).collect();
            tx.execute(&tx.prepare_cached(UNCLEAR).await?, &[&p, &k, &e, &t])
                .await?;
        }

        let uuids: Vec<uuid::Uuid> = live.iter().map(|(_, _, u, _)| *u).collect();
        tx.execute(&tx.prepare_cached(PROCESSED).await?, &[&uuids])
            .await?;

        // What was decided for this batch (now or in an earlier delivery).
        let ids: Vec<&str> = live.iter().map(|(m, ..)| m.event_id.as_str()).collect();
        let rows = tx
            .query(&tx.prepare_cached(DECISIONS).await?, &[&ids])
            .await?;
        let decided: std::collections::HashMap<String, (Option<ConsentState>, ConsentState, bool)> =
            rows.iter()
                .map(|r| (r.get::<_, String>(0), (r.get(2), r.get(3), r.get(4))))
                .collect();
        let asking: Vec<_> = live
            .iter()
            .filter(|(.., i)| matches!(i, Intent::Help(_) | Intent::Rule(..) | Intent::Unclear(_)))
            .collect();
        let states: std::collections::HashMap<String, ConsentState> = if asking.is_empty() {
            Default::default()
        } else {
            let p: Vec<&str> = asking.iter().map(|(m, ..)| m.from.as_str()).collect();
            let t: Vec<DateTime<Utc>> = asking.iter().map(|(_, at, ..)| *at).collect();
            let e: Vec<&str> = asking.iter().map(|(m, ..)| m.event_id.as_str()).collect();
            let c: Vec<&str> = asking.iter().map(|(m, ..)| m.channel.as_str()).collect();
            tx.query(&tx.prepare_cached(STATES_AT).await?, &[&p, &t, &e, &c])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        };
        for r in &rows {
            if !r.get::<_, bool>(4) {
                continue;
            }
            let phone: String = r.get(1);
            let at: DateTime<Utc> = r.get(7);
            let change = ConsentChange {
                phone: phone.clone(),
                state: r.get(3),
                source: r.get(6),
                keyword: r.get(5),
                source_event_id: r.get(0),
                occurred_at: at.timestamp_millis(),
                channel: r.get(8),
            };
            out.emit(from(&change.source_event_id), "changes", phone, &change)
                .await?;
        }

        // Numbers clarified lately get no second clarification.
        let mut clarified: std::collections::HashSet<String> =
            if self.cfg.clarify && !unclear.is_empty() {
                let p: Vec<&str> = unclear.iter().map(|u| u.0).collect();
                let within = self.cfg.clarify_interval.as_secs_f64();
                tx.query(&tx.prepare_cached(CLARIFIED).await?, &[&p, &within])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            } else {
                Default::default()
            };

        // Auto-replies: rows first (idempotent by the inbound event), then
        // every still-queued reply of this batch goes to the sender. Help,
        // rules and clarifications go to any number not opted out.
        let mut replies: Vec<(&str, &str, String, String, SendKind)> = Vec::new();
        for (m, _, _, intent) in &live {
            let reachable = !matches!(states.get(&m.event_id), Some(ConsentState::OptOut) | None);
            let (text, kind) = match intent {
                Intent::OptOut(_) => match decided.get(&m.event_id) {
                    Some((old, new, true)) if *old != Some(*new) => {
                        (&self.cfg.opt_out_reply, SendKind::OptOutConfirmation)
                    }
                    _ => continue,
                },
                Intent::OptIn(_) => match decided.get(&m.event_id) {
                    Some((old, new, true)) if *old != Some(*new) => {
                        (&self.cfg.opt_in_reply, SendKind::Reply)
                    }
                    _ => continue,
                },
                Intent::Help(_) if reachable => (&self.cfg.help_reply, SendKind::Reply),
                Intent::Rule(_, reply) if reachable => (reply, SendKind::Reply),
                Intent::Unclear(_)
                    if reachable && self.cfg.clarify && clarified.insert(m.from.clone()) =>
                {
                    (&self.cfg.clarify_reply, SendKind::Clarification)
                }
                _ => continue,
            };
            if !text.is_empty() {
                replies.push((
                    m.from.as_str(),
                    m.channel.as_str(),
                    text.clone(),
                    reply_key(&m.event_id),
                    kind,
                ));
            }
        }
        if !replies.is_empty() {
            let p: Vec<&str> = replies.iter().map(|r| r.0).collect();
            let c: Vec<&str> = replies.iter().map(|r| r.1).collect();
            let b: Vec<&str> = replies.iter().map(|r| r.2.as_str()).collect();
            let k: Vec<&str> = replies.iter().map(|r| r.3.as_str()).collect();
            let kinds: Vec<SendKind> = replies.iter().map(|r| r.4).collect();
            let ids: Vec<uuid::Uuid> = replies.iter().map(|_| uuid::Uuid::now_v7()).collect();
            tx.execute(
                &tx.prepare_cached(INSERT_REPLIES).await?,
                &[&p, &c, &b, &k, &kinds, &ids],
            )
            .await?;
        }
        let keys: Vec<String> = live
            .iter()
            .filter(|(_, _, _, intent)| *intent != Intent::None)
            .map(|(m, ..)| reply_key(&m.event_id))
            .collect();
        if !keys.is_empty() {
            for r in tx
                .query(&tx.prepare_cached(QUEUED_REPLIES).await?, &[&keys])
                .await?
            {
                let recipient: String = r.get(1);
                let key: String = r.get(4);
                let event = key.trim_start_matches("reply:");
                let send = SendRequest {
                    message_id: r.get(0),
                    campaign_id: None,
                    recipient: recipient.clone(),
                    channel: r.get(2),
                    body: r.get(3),
                    attempt: 0,
                    kind: r.get(5),
                    not_before: None,
                };
                out.emit(from(event), "sends", recipient, &send).await?;
            }
        }
        Ok(())
    }
}
