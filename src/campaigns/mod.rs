//! Campaigns: templates ([`template`]), segment filters ([`segment`]), the
//! campaign state machine and its commands, the admin API ([`api`]) and the
//! scheduler ([`scheduler`]). The fan-out itself is the `fanout` stage.
//!
//! The state machine (the seed's): DRAFT → READY → RUNNING → COMPLETED;
//! DRAFT, READY and RUNNING may be PAUSED (resume returns to where it was);
//! anything not final may be CANCELLED; COMPLETED and CANCELLED are final.
//! COMPLETED is reached only by the scheduler, once the fan-out finished and
//! every message is final.

pub mod api;
pub mod scheduler;
pub mod segment;
pub mod template;

use std::time::Duration;

use deadpool_postgres::Transaction;
use rdkafka::producer::FutureRecord;

use crate::codec::Codec;
use crate::records::CampaignCommand;

/// Statuses a campaign can no longer leave.
pub const FINAL: &[&str] = &["COMPLETED", "CANCELLED"];

/// Message statuses after which nothing more happens to a message.
pub const FINAL_MESSAGE: &[&str] = &["DELIVERED", "READ", "UNDELIVERED", "FAILED"];

/// The actions of `POST /api/v1/campaigns/{id}/{action}`.
pub const ACTIONS: &[&str] = &["ready", "start", "pause", "resume", "cancel"];

/// The actions allowed from `status`.
pub fn allowed(status: &str) -> &'static [&'static str] {
    match status {
        "DRAFT" => &["ready", "pause", "cancel"],
        "READY" => &["start", "pause", "cancel"],
        "RUNNING" => &["pause", "cancel"],
        "PAUSED" => &["resume", "cancel"],
        _ => &[],
    }
}

/// The status `action` leads to from `status` (`paused_from` for resume), or
/// `None` when the transition is illegal. `complete` is the scheduler's own.
pub fn next(status: &str, paused_from: Option<&str>, action: &str) -> Option<&'static str> {
    if action == "complete" {
        return (status == "RUNNING").then_some("COMPLETED");
    }
    if !allowed(status).contains(&action) {
        return None;
    }
    Some(match action {
        "ready" => "READY",
        "start" => "RUNNING",
        "pause" => "PAUSED",
        "resume" => match paused_from {
            Some("DRAFT") => "DRAFT",
            Some("READY") => "READY",
            _ => "RUNNING",
        },
        _ => "CANCELLED",
    })
}

/// Why a transition did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("campaign {0} does not exist")]
    NotFound(i64),
    #[error(
        "cannot {action} a {status} campaign; allowed: {}",
        allowed_text(status)
    )]
    Illegal { action: String, status: String },
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("publishing the command: {0}")]
    Kafka(String),
}

fn allowed_text(status: &str) -> String {
    match allowed(status) {
        [] => "none (final)".to_string(),
        a => a.join(", "),
    }
}

/// Where commands go and how they are written.
#[derive(Clone)]
pub struct Commands {
    pub producer: crate::kafka::Producer,
    pub codec: Codec,
    pub topic: String,
    pub timeout: Duration,
}

impl Commands {
    /// Applies `action` to campaign `id` inside `tx` and publishes the command
    /// before the caller commits: a command on the topic whose transaction
    /// then failed is harmless (the fanout stage acts on the stored state),
    /// a committed transition without its command cannot happen.
    pub async fn transition(
        &self,
        tx: &Transaction<'_>,
        id: i64,
        action: &str,
        issued_by: &str,
    ) -> Result<&'static str, TransitionError> {
        let row = tx
            .query_opt(
                "SELECT status, paused_from FROM campaigns WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
            .ok_or(TransitionError::NotFound(id))?;
        let status: String = row.get(0);
        let paused_from: Option<String> = row.get(1);
        let to = next(&status, paused_from.as_deref(), action).ok_or_else(|| {
            TransitionError::Illegal {
                action: action.to_string(),
                status: status.clone(),
            }
        })?;
        let paused_from = (to == "PAUSED").then_some(status.as_str());
        tx.execute(
            "UPDATE campaigns SET status = $2, paused_from = $3, updated_at = now(),
                    started_at = CASE WHEN $2 = 'RUNNING' THEN coalesce(started_at, now()) ELSE started_at END,
                    completed_at = CASE WHEN $2 IN ('COMPLETED', 'CANCELLED') THEN now() ELSE completed_at END
              WHERE id = $1",
            &[&id, &to, &paused_from],
        )
        .await?;
        if to == "RUNNING" {
            tx.execute(
                "INSERT INTO fanout_progress (campaign_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&id],
            )
            .await?;
        }
        self.publish(id, action, to, issued_by).await?;
        Ok(to)
    }

    async fn publish(
        &self,
        id: i64,
        action: &str,
        status: &str,
        issued_by: &str,
    ) -> Result<(), TransitionError> {
        let command = CampaignCommand {
            command_id: uuid::Uuid::now_v7().to_string(),
            campaign_id: id,
            command: action.to_string(),
            status: status.to_string(),
            issued_by: issued_by.to_string(),
            issued_at: chrono::Utc::now().timestamp_millis(),
        };
        let payload = self
            .codec
            .encode(&self.topic, &command)
            .await
            .map_err(|e| TransitionError::Kafka(e.to_string()))?;
        let key = id.to_string();
        let record = FutureRecord::<[u8], [u8]>::to(&self.topic)
            .key(key.as_bytes())
            .payload(payload.as_slice());
        self.producer
            .send_all(vec![record], self.timeout)
            .await
            .map_err(|e| TransitionError::Kafka(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine() {
        assert_eq!(next("DRAFT", None, "ready"), Some("READY"));
        assert_eq!(next("READY", None, "start"), Some("RUNNING"));
        assert_eq!(next("RUNNING", None, "pause"), Some("PAUSED"));
        assert_eq!(next("PAUSED", Some("RUNNING"), "resume"), Some("RUNNING"));
        assert_eq!(next("PAUSED", Some("READY"), "resume"), Some("READY"));
        assert_eq!(next("RUNNING", None, "complete"), Some("COMPLETED"));
        assert_eq!(next("DRAFT", None, "start"), None);
        assert_eq!(next("COMPLETED", None, "cancel"), None);
        assert_eq!(next("CANCELLED", None, "resume"), None);
        for s in ["DRAFT", "READY", "RUNNING", "PAUSED"] {
            assert_eq!(next(s, None, "cancel"), Some("CANCELLED"));
        }
    }
}
