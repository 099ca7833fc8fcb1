//! The sender's background work: held messages back on `sends` when due,
//! held messages of cancelled campaigns failed, messages left SENDING
//! reconciled with the provider.

use std::time::Duration;
use uuid::Uuid;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use metrics::counter;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::fold_beaten;
use crate::codec::Codec;
use crate::kafka::Producer;
use crate::model::Channel;
use crate::records::SendRequest;
use crate::twilio::Provider;

/// Puts held messages that are due back on `sends`, fails held messages of
/// cancelled campaigns, and reconciles messages left SENDING.
pub struct Pump {
    pub pool: Pool,
    pub producer: Producer,
    pub codec: Codec,
    pub provider: Provider,
    pub sends_topic: String,
    pub interval: Duration,
    pub reconcile_after: Duration,
    pub produce_timeout: Duration,
    /// Free-form WhatsApp may go as this template (`sender.whatsapp-fallback-content-sid`).
    pub whatsapp_fallback: bool,
}

const DROP_CANCELLED: &str = "
UPDATE messages m SET status = 'FAILED', failure_reason = 'campaign ' || lower(c.status),
                      parked_until = NULL, updated_at = now()
  FROM campaigns c
 WHERE c.id = m.campaign_id AND m.parked_until IS NOT NULL AND m.status = 'QUEUED'
   AND c.status IN ('CANCELLED', 'COMPLETED')";

const DUE: &str = "
SELECT m.id, m.campaign_id, m.recipient_phone, m.channel, m.rendered_content, m.retry_count, m.kind
  FROM messages m LEFT JOIN campaigns c ON c.id = m.campaign_id
 WHERE m.parked_until <= now() AND m.status = 'QUEUED'
   AND (m.campaign_id IS NULL OR c.status = 'RUNNING')
 ORDER BY m.parked_until LIMIT 5000
 FOR UPDATE OF m SKIP LOCKED";

const UNPARK: &str = "
UPDATE messages SET parked_until = NULL, parked_reason = NULL WHERE id = ANY($1)";

const STUCK: &str = "
SELECT id, recipient_phone, channel, rendered_content, claimed_at, content_sid IS NOT NULL FROM messages
 WHERE status = 'SENDING' AND claimed_at < now() - make_interval(secs => $1::float8)
 ORDER BY claimed_at LIMIT 100";

impl Pump {
    pub async fn run(self, shutdown: CancellationToken) {
        crate::periodic::Task::every(
            "sender pump",
            crate::metrics::names::SENDER_PUMP_ERRORS_TOTAL,
            self.interval,
        )
        .run(shutdown, || self.pass())
        .await
    }

    async fn pass(&self) -> anyhow::Result<()> {
        let mut client = self.pool.get().await?;
        client.execute(DROP_CANCELLED, &[]).await?;
        loop {
            let tx = client.transaction().await?;
            let rows = tx.query(DUE, &[]).await?;
            if rows.is_empty() {
                break;
            }
            let sends: Vec<SendRequest> = rows
                .iter()
                .map(|r| SendRequest {
                    message_id: r.get(0),
                    campaign_id: r.get(1),
                    recipient: r.get(2),
                    channel: r.get(3),
                    body: r.get(4),
                    attempt: r.get(5),
                    kind: r.get(6),
                    not_before: None,
                })
                .collect();
            crate::stages::produce_sends(
                &self.producer,
                &self.codec,
                &self.sends_topic,
                &sends,
                self.produce_timeout,
            )
            .await?;
            let ids: Vec<Uuid> = sends.iter().map(|s| s.message_id).collect();
            tx.execute(UNPARK, &[&ids]).await?;
            tx.commit().await?;
            counter!(crate::metrics::names::SENDER_RELEASED_TOTAL).increment(ids.len() as u64);
        }
        self.reconcile(&client).await
    }

    /// Messages left SENDING: SENT if the provider has them, else sent again.
    async fn reconcile(&self, client: &deadpool_postgres::Client) -> anyhow::Result<()> {
        let secs = self.reconcile_after.as_secs_f64();
        for r in client.query(STUCK, &[&secs]).await? {
            let (id, phone, channel, body, claimed): (
                Uuid,
                String,
                Channel,
                String,
                DateTime<Utc>,
            ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            // A template's text is the provider's rendering: any text matches.
            let template =
                r.get::<_, bool>(5) || (channel == Channel::Whatsapp && self.whatsapp_fallback);
            let text = (!template).then_some(body.as_str());
            // A SID another message already holds is that message's send
            // of the same text, not this one's.
            let candidates = self.provider.find(channel, &phone, text, claimed).await?;
            let held: Vec<String> = if candidates.is_empty() {
                Vec::new()
            } else {
                client
                    .query(
                        "SELECT provider_sid FROM messages WHERE provider_sid = ANY($1)",
                        &[&candidates],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            };
            match candidates.into_iter().find(|sid| !held.contains(sid)) {
                Some(sid) => {
                    client
                        .execute(
                            "UPDATE messages SET status = 'SENT', provider_sid = $2, sent_at = $3, updated_at = now()
                              WHERE id = $1 AND status = 'SENDING'",
                            &[&id, &sid, &claimed],
                        )
                        .await?;
                    fold_beaten(client, &[sid.as_str()]).await?;
                    counter!(crate::metrics::names::SENDER_RECONCILED_TOTAL, "outcome" => "sent")
                        .increment(1);
                    info!(message = %id, sid, "reconciled: the provider has it");
                }
                None => {
                    client
                        .execute(
                            "UPDATE messages SET status = 'QUEUED', claimed_at = NULL, parked_until = now(),
                                    parked_reason = 'reconciled: not at the provider', updated_at = now()
                              WHERE id = $1 AND status = 'SENDING'",
                            &[&id],
                        )
                        .await?;
                    counter!(crate::metrics::names::SENDER_RECONCILED_TOTAL, "outcome" => "requeued").increment(1);
                    info!(
                        message = %id,
                        "reconciled: the provider never got it; sending again"
                    );
                }
            }
        }
        Ok(())
    }
}
