//! `/api/v1/reports`: the data model's campaign performance and real-time
//! dashboard figures (`crate::reports`).

use std::sync::Arc;
use uuid::Uuid;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::error::ApiError;
use super::extract::ApiQuery;
use super::{Admin, ApiResult, json};
use crate::reports::{CAMPAIGNS_SINCE, DASHBOARD};

/// The reports' routes and their part of the document.
#[derive(OpenApi)]
#[openapi(paths(campaign_report, dashboard_report))]
pub(super) struct Doc;

pub(super) fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route("/api/v1/reports/campaigns", get(campaign_report))
        .route("/api/v1/reports/dashboard", get(dashboard_report))
}

/// `?since=`: campaigns created at or after it.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ReportQuery {
    /// A date (`2026-11-01`, midnight UTC) or an RFC 3339 date-time; 30
    /// days before today (UTC) unless given, as in the data model's query.
    #[param(schema_with = super::schema::date_or_date_time)]
    since: Option<String>,
}

/// One campaign's delivery figures.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CampaignFigures {
    campaign_id: Uuid,
    name: String,
    status: String,
    created_at: DateTime<Utc>,
    /// Messages of the campaign.
    total_sent: i64,
    /// Messages with a `delivered` receipt.
    delivered: i64,
    /// Mean minutes from sent to the first `delivered` receipt; null
    /// before any.
    avg_delivery_time_mins: Option<f64>,
}

/// Campaign figures since a moment.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CampaignReport {
    since: DateTime<Utc>,
    /// Newest campaign first.
    items: Vec<CampaignFigures>,
}

/// The moment `?since=` names: a date (midnight UTC) or an RFC 3339 date-time.
fn since(text: Option<&str>) -> Result<DateTime<Utc>, ApiError> {
    let Some(text) = text else {
        let today = Utc::now().date_naive();
        return Ok((today - Duration::days(30))
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc())
            .unwrap_or_else(Utc::now));
    };
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            ApiError::invalid(
                "/since",
                format!("{text:?} is not a date (YYYY-MM-DD) or an RFC 3339 date-time"),
            )
        })
}

/// Campaign performance: messages, delivered, mean delivery time
#[utoipa::path(
    get,
    path = "/api/v1/reports/campaigns",
    tag = "reports",
    params(ReportQuery),
    responses((status = 200, description = "Campaigns created since `since`", body = CampaignReport))
)]
pub(super) async fn campaign_report(
    State(a): State<Arc<Admin>>,
    ApiQuery(q): ApiQuery<ReportQuery>,
) -> ApiResult {
    let since = since(q.since.as_deref())?;
    let client = a.pool.get().await?;
    let rows = client.query(CAMPAIGNS_SINCE, &[&since]).await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(CampaignFigures {
                campaign_id: r.try_get("id")?,
                name: r.try_get("name")?,
                status: r.try_get("status")?,
                created_at: r.try_get("created_at")?,
                total_sent: r.try_get("total_sent")?,
                delivered: r.try_get("delivered")?,
                avg_delivery_time_mins: r.try_get("avg_delivery_time_mins")?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    json(StatusCode::OK, CampaignReport { since, items })
}

/// The real-time dashboard's figures.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Dashboard {
    /// Campaigns READY or RUNNING.
    active_campaigns: i64,
    /// Users whose consent is OPT_IN.
    opted_in_users: i64,
    /// Messages created today (the database's day) and DELIVERED.
    delivered_today: i64,
    /// Inbound messages received in the last hour.
    recent_inbound: i64,
}

/// The real-time dashboard: active campaigns, opted-in users, delivered today, inbound last hour
#[utoipa::path(
    get,
    path = "/api/v1/reports/dashboard",
    tag = "reports",
    responses((status = 200, description = "The figures now", body = Dashboard))
)]
pub(super) async fn dashboard_report(State(a): State<Arc<Admin>>) -> ApiResult {
    let client = a.pool.get().await?;
    let r = client.query_one(DASHBOARD, &[]).await?;
    json(
        StatusCode::OK,
        Dashboard {
            active_campaigns: r.try_get("active_campaigns")?,
            opted_in_users: r.try_get("opted_in_users")?,
            delivered_today: r.try_get("delivered_today")?,
            recent_inbound: r.try_get("recent_inbound")?,
        },
    )
}
