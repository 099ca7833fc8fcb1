//! Campaigns: templates ([`template`]), segment filters ([`segment`]), the
//! campaign state machine and its commands, the admin API ([`api`]) and the
//! scheduler ([`scheduler`]). The fan-out itself is the `fanout` stage.
//!
//! The state machine itself is [`crate::model::CampaignStatus::next`].

pub mod api;
pub mod scheduler;
pub mod segment;
pub mod template;

use std::time::Duration;
use uuid::Uuid;

use deadpool_postgres::Transaction;
use rdkafka::producer::FutureRecord;

use crate::codec::Codec;
use crate::model::{CampaignAction, CampaignStatus};
use crate::records::CampaignCommand;

/// Why a transition did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("campaign {0} does not exist")]
    NotFound(Uuid),
    #[error(
        "cannot {action} a {status} campaign; allowed: {}",
        allowed_text(*status)
    )]
    Illegal {
        action: CampaignAction,
        status: CampaignStatus,
    },
    #[error("campaign {id} has no {missing} (deleted); it cannot be {status}")]
    Incomplete {
        id: Uuid,
        missing: &'static str,
        status: CampaignStatus,
    },
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("publishing the command: {0}")]
    Kafka(String),
}

fn allowed_text(status: CampaignStatus) -> String {
    match status.allowed() {
        [] => "none (final)".to_string(),
        a => a.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "),
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
    /// Publishes on `topics.campaign-commands` with the process's producer.
    pub fn new(deps: &crate::runner::Deps) -> anyhow::Result<Self> {
        Ok(Self {
            producer: deps.producer.clone(),
            codec: deps.codec.clone(),
            topic: deps.settings.commands_topic()?,
            timeout: deps.settings.kafka.produce_timeout,
        })
    }

    /// Applies `action` to campaign `id` inside `tx` and publishes the command
    /// before the caller commits: a command on the topic whose transaction
    /// then failed is harmless (the fanout stage acts on the stored state),
    /// a committed transition without its command cannot happen.
    pub async fn transition(
        &self,
        tx: &Transaction<'_>,
        id: Uuid,
        action: CampaignAction,
        issued_by: &str,
    ) -> Result<CampaignStatus, TransitionError> {
        let row = tx
            .query_opt(
                "SELECT status, paused_from, template_id IS NULL, segment_id IS NULL
                   FROM campaigns WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
            .ok_or(TransitionError::NotFound(id))?;
        let status: CampaignStatus = row.get(0);
        let paused_from: Option<CampaignStatus> = row.get(1);
        let to = status
            .next(paused_from, action)
            .ok_or(TransitionError::Illegal { action, status })?;
        // A draft or finished campaign may have lost its template or segment
        // (deleted); an active one needs both.
        if CampaignStatus::ACTIVE.contains(&to) {
            for (missing, gone) in [("template", row.get::<_, bool>(2)), ("segment", row.get(3))] {
                if gone {
                    return Err(TransitionError::Incomplete {
                        id,
                        missing,
                        status: to,
                    });
                }
            }
        }
        let paused_from = (to == CampaignStatus::Paused).then_some(status);
        tx.execute(
            "UPDATE campaigns SET status = $2, paused_from = $3, updated_at = now(),
                    started_at = CASE WHEN $2 = 'RUNNING' THEN coalesce(started_at, now()) ELSE started_at END,
                    completed_at = CASE WHEN $2 IN ('COMPLETED', 'CANCELLED') THEN now() ELSE completed_at END
              WHERE id = $1",
            &[&id, &to, &paused_from],
        )
        .await?;
        if to == CampaignStatus::Running {
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
        id: Uuid,
        action: CampaignAction,
        status: CampaignStatus,
        issued_by: &str,
    ) -> Result<(), TransitionError> {
        let command = CampaignCommand {
            command_id: uuid::Uuid::now_v7().to_string(),
            campaign_id: id,
            command: action,
            status,
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
