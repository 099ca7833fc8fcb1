//! Read-side queries from the data model: its three query patterns as
//! DATA-MODEL.md writes them (`sql/reports/`, run verbatim by the tests and
//! by the Grafana dashboard), campaign performance as the admin API serves
//! it, and one campaign's messages per status.

use serde::Serialize;
use uuid::Uuid;

/// The data model's segment evaluation, verbatim.
pub const MODEL_SEGMENT_EVALUATION: &str = include_str!("../sql/reports/segment_evaluation.sql");
/// The data model's campaign performance, verbatim (its last 30 days).
pub const MODEL_CAMPAIGN_PERFORMANCE: &str =
    include_str!("../sql/reports/campaign_performance.sql");
/// The data model's real-time dashboard, verbatim: what
/// `GET /api/v1/reports/dashboard` answers.
pub const DASHBOARD: &str = include_str!("../sql/reports/dashboard.sql");
/// Campaign performance since `$1`, each message counted once:
/// `GET /api/v1/reports/campaigns?since=`.
pub const CAMPAIGNS_SINCE: &str = include_str!("../sql/reports/campaigns_since.sql");

/// Messages per status for one campaign, and its delivery rate.
pub const CAMPAIGN_PERFORMANCE: &str = "
SELECT c.id, c.name, c.status,
       count(m.id) AS total,
       count(*) FILTER (WHERE m.status = 'QUEUED') AS queued,
       count(*) FILTER (WHERE m.status = 'SENDING') AS sending,
       count(*) FILTER (WHERE m.status = 'SENT') AS sent,
       count(*) FILTER (WHERE m.status = 'DELIVERED') AS delivered,
       count(*) FILTER (WHERE m.status = 'READ') AS read,
       count(*) FILTER (WHERE m.status = 'UNDELIVERED') AS undelivered,
       count(*) FILTER (WHERE m.status = 'FAILED') AS failed,
       coalesce(round(100.0 * count(*) FILTER (WHERE m.status IN ('DELIVERED', 'READ'))
             / nullif(count(*) FILTER (WHERE m.status IN ('SENT', 'DELIVERED', 'READ', 'UNDELIVERED', 'FAILED')), 0), 2), 0)::float8
           AS delivery_rate_pct
  FROM campaigns c
  LEFT JOIN messages m ON m.campaign_id = c.id
 WHERE c.id = $1
 GROUP BY c.id";

/// A row of [`CAMPAIGN_PERFORMANCE`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CampaignPerformance {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub total: i64,
    pub queued: i64,
    pub sending: i64,
    pub sent: i64,
    pub delivered: i64,
    pub read: i64,
    pub undelivered: i64,
    pub failed: i64,
    /// Delivered or read among messages that left the engine, in percent.
    pub delivery_rate_pct: f64,
}

/// Runs [`CAMPAIGN_PERFORMANCE`] for campaign `id`; `None` if it does not exist.
pub async fn campaign_performance(
    client: &tokio_postgres::Client,
    id: Uuid,
) -> Result<Option<CampaignPerformance>, tokio_postgres::Error> {
    let row = client.query_opt(CAMPAIGN_PERFORMANCE, &[&id]).await?;
    Ok(row.map(|r| CampaignPerformance {
        id: r.get(0),
        name: r.get(1),
        status: r.get(2),
        total: r.get(3),
        queued: r.get(4),
        sending: r.get(5),
        sent: r.get(6),
        delivered: r.get(7),
        read: r.get(8),
        undelivered: r.get(9),
        failed: r.get(10),
        delivery_rate_pct: r.get(11),
    }))
}
