//! `normalize`: raw provider webhooks → the immutable audit trail
//! (`delivery_receipts`, `inbound_events`, idempotent by event id) and
//! normalized records for the next stages. Phones become E.164 (channel kept),
//! statuses the engine's vocabulary, `ErrorCode` an integer. A record that
//! cannot be normalized is still kept in the audit trail, marked invalid, and
//! dead-lettered with the reason.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use tokio_postgres::types::{ToSql, Type};

use crate::phone::{Channel, Normalizer};
use crate::records::{InboundNormalized, ParamsJson, ReceiptNormalized, WebhookRaw};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::runner::{Collector, Deps, Item, Stage, StageError};

/// Status values the engine knows (the provider's, lowercased).
pub const STATUSES: &[&str] = &[
    "accepted",
    "scheduled",
    "queued",
    "sending",
    "sent",
    "delivered",
    "undelivered",
    "failed",
    "read",
    "receiving",
    "received",
    "canceled",
    "partially_delivered",
];

const INSERT_RECEIPTS: &str = "
INSERT INTO delivery_receipts (event_id, message_sid, message_status, error_code, raw_payload, received_at, phone_valid, id)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::jsonb[], $6::timestamptz[], $7::bool[], $8::uuid[])
ON CONFLICT (event_id) DO NOTHING";

/// Audit rows of status callbacks by binary COPY, and its column types.
/// Their `id` is a UUIDv7 the stage makes (time-ordered: the primary key's
/// index grows at its end).
pub const COPY_RECEIPTS: &str = "COPY delivery_receipts (event_id, message_sid, message_status, error_code, raw_payload, received_at, phone_valid, id) FROM STDIN BINARY";

pub const RECEIPT_TYPES: &[Type] = &[
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::JSONB,
    Type::TIMESTAMPTZ,
    Type::BOOL,
    Type::UUID,
];

const INSERT_INBOUND: &str = "
INSERT INTO inbound_events (event_id, message_sid, from_phone, raw_from, to_phone, channel, body, raw_payload, processing_status, received_at, id)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::jsonb[], $9::text[], $10::timestamptz[], $11::uuid[])
ON CONFLICT (event_id) DO NOTHING";

/// The normalize stage.
pub struct Normalize {
    pub phones: Normalizer,
}

/// The stage, until `shutdown`.
pub fn start(deps: Deps, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let phones = Normalizer::new(&deps.settings.phone.default_region);
        deps.consume("normalize", Normalize { phones }, shutdown)
            .await
    })
}

#[derive(Default)]
struct ReceiptRows<'a> {
    id: Vec<uuid::Uuid>,
    event_id: Vec<uuid::Uuid>,
    sid: Vec<String>,
    status: Vec<String>,
    error_code: Vec<Option<i32>>,
    raw: Vec<ParamsJson<'a>>,
    received_at: Vec<DateTime<Utc>>,
    phone_valid: Vec<bool>,
}

#[derive(Default)]
struct InboundRows<'a> {
    id: Vec<uuid::Uuid>,
    event_id: Vec<uuid::Uuid>,
    sid: Vec<String>,
    from: Vec<Option<String>>,
    raw_from: Vec<String>,
    to: Vec<String>,
    channel: Vec<Channel>,
    body: Vec<String>,
    raw: Vec<ParamsJson<'a>>,
    status: Vec<String>,
    received_at: Vec<DateTime<Utc>>,
}

/// `whatsapp:+1415…` → `+1415…` without validating (for the `to` of inbound).
fn strip_channel(addr: &str) -> &str {
    match addr.split_once(':') {
        Some((p, rest)) if p.eq_ignore_ascii_case("whatsapp") => rest,
        _ => addr,
    }
}

impl Normalize {
    /// Adds one status callback to `rows`; the output, or why it is poison.
    fn status<'a>(
        &self,
        raw: &'a WebhookRaw,
        event_id: uuid::Uuid,
        at: DateTime<Utc>,
        rows: &mut ReceiptRows<'a>,
    ) -> Result<ReceiptNormalized, String> {
        let sid = raw.param("MessageSid").unwrap_or_default().to_string();
        let given = raw
            .param("MessageStatus")
            .or_else(|| raw.param("SmsStatus"))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let mut problems = Vec::new();
        let status = if STATUSES.contains(&given.as_str()) {
            given.clone()
        } else {
            problems.push(format!("unknown MessageStatus {given:?}"));
            "unknown".to_string()
        };
        let error_code = match raw
            .param("ErrorCode")
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(code) => match code.parse::<i32>() {
                Ok(c) => Some(c),
                Err(_) => {
                    problems.push(format!("ErrorCode {code:?} is not an integer"));
                    None
                }
            },
        };
        let (channel, recipient) = match raw.param("To") {
            None => (Channel::Sms, None),
            Some(to) => match self.phones.address(to) {
                Ok((channel, e164)) => (channel, Some(e164)),
                Err(e) => {
                    problems.push(format!("To: {e}"));
                    (Channel::Sms, None)
                }
            },
        };
        let channel = if raw
            .param("ChannelPrefix")
            .is_some_and(|p| p.eq_ignore_ascii_case("whatsapp"))
        {
            Channel::Whatsapp
        } else {
            channel
        };
        rows.id.push(uuid::Uuid::now_v7());
        rows.event_id.push(event_id);
        rows.sid.push(sid.clone());
        rows.status.push(status.clone());
        rows.error_code.push(error_code);
        rows.raw.push(ParamsJson(&raw.params));
        rows.received_at.push(at);
        rows.phone_valid
            .push(!problems.iter().any(|p| p.starts_with("To:")));
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(ReceiptNormalized {
            event_id: raw.event_id.clone(),
            message_sid: sid,
            status,
            error_code,
            channel,
            recipient,
            received_at: raw.received_at,
        })
    }

    /// Adds one inbound message to `rows`; the output, or why it is poison.
    fn inbound<'a>(
        &self,
        raw: &'a WebhookRaw,
        event_id: uuid::Uuid,
        at: DateTime<Utc>,
        rows: &mut InboundRows<'a>,
    ) -> Result<InboundNormalized, String> {
        let sid = raw.param("MessageSid").unwrap_or_default().to_string();
        let raw_from = raw.param("From").unwrap_or_default().to_string();
        let to = strip_channel(raw.param("To").unwrap_or_default()).to_string();
        let body = raw.param("Body").unwrap_or_default().to_string();
        let parsed = self.phones.address(&raw_from);
        let channel = match &parsed {
            Ok((c, _)) => *c,
            Err(_) if raw_from.to_ascii_lowercase().starts_with("whatsapp:") => Channel::Whatsapp,
            Err(_) => Channel::Sms,
        };
        rows.id.push(uuid::Uuid::now_v7());
        rows.event_id.push(event_id);
        rows.sid.push(sid.clone());
        rows.from.push(parsed.as_ref().ok().map(|(_, p)| p.clone()));
        rows.raw_from.push(raw_from.clone());
        rows.to.push(to.clone());
        rows.channel.push(channel);
        rows.body.push(body.clone());
        rows.raw.push(ParamsJson(&raw.params));
        rows.status
            .push(if parsed.is_ok() { "PENDING" } else { "INVALID" }.to_string());
        rows.received_at.push(at);
        let (_, from) = parsed.map_err(|e| format!("From: {e}"))?;
        Ok(InboundNormalized {
            event_id: raw.event_id.clone(),
            message_sid: sid,
            from,
            to,
            channel,
            body,
            profile_name: raw.param("ProfileName").map(str::to_string),
            wa_id: raw.param("WaId").map(str::to_string),
            num_media: raw
                .param("NumMedia")
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0),
            received_at: raw.received_at,
        })
    }
}

impl Stage for Normalize {
    type Input = WebhookRaw;

    async fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<WebhookRaw>],
        out: &mut Collector,
    ) -> Result<(), StageError> {
        let mut receipts = ReceiptRows::default();
        let mut inbound = InboundRows::default();
        for (i, item) in batch.iter().enumerate() {
            let raw = &item.value;
            let Ok(event_id) = raw.event_id.parse::<uuid::Uuid>() else {
                out.dead_letter(i, format!("event_id {:?} is not a UUID", raw.event_id));
                continue;
            };
            let Some(at) = DateTime::<Utc>::from_timestamp_millis(raw.received_at) else {
                out.dead_letter(
                    i,
                    format!("received_at {} is out of range", raw.received_at),
                );
                continue;
            };
            match raw.kind.as_str() {
                "status" => match self.status(raw, event_id, at, &mut receipts) {
                    Ok(r) => {
                        out.emit(&item.record, "receipts", r.message_sid.clone(), &r)
                            .await?
                    }
                    Err(reason) => out.dead_letter(i, reason),
                },
                "inbound" => match self.inbound(raw, event_id, at, &mut inbound) {
                    Ok(r) => {
                        out.emit(&item.record, "inbound", r.from.clone(), &r)
                            .await?
                    }
                    Err(reason) => out.dead_letter(i, reason),
                },
                other => out.dead_letter(i, format!("unknown webhook kind {other:?}")),
            }
        }
        let r = &receipts;
        let rows = (0..r.event_id.len()).map(|i| -> Vec<&(dyn ToSql + Sync)> {
            vec![
                &r.event_id[i],
                &r.sid[i],
                &r.status[i],
                &r.error_code[i],
                &r.raw[i],
                &r.received_at[i],
                &r.phone_valid[i],
                &r.id[i],
            ]
        });
        // Rows are new unless this batch is a replay: COPY them, and insert
        // with ON CONFLICT only when some exist already.
        if !r.event_id.is_empty()
            && !crate::db::copy_new_rows(tx, COPY_RECEIPTS, RECEIPT_TYPES, rows).await?
        {
            let stmt = tx.prepare_cached(INSERT_RECEIPTS).await?;
            tx.execute(
                &stmt,
                &[
                    &r.event_id,
                    &r.sid,
                    &r.status,
                    &r.error_code,
                    &r.raw,
                    &r.received_at,
                    &r.phone_valid,
                    &r.id,
                ],
            )
            .await?;
        }
        if !inbound.event_id.is_empty() {
            let stmt = tx.prepare_cached(INSERT_INBOUND).await?;
            let r = &inbound;
            tx.execute(
                &stmt,
                &[
                    &r.event_id,
                    &r.sid,
                    &r.from,
                    &r.raw_from,
                    &r.to,
                    &r.channel,
                    &r.body,
                    &r.raw,
                    &r.status,
                    &r.received_at,
                    &r.id,
                ],
            )
            .await?;
        }
        Ok(())
    }
}
