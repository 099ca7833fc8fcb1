//! `/api/v1/campaigns`: campaigns, their message counts and fan-out
//! progress, and the operator's transitions.

use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Datelike, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::Row;
use tokio_postgres::types::Json;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, check_name, integer, nullable, present};
use super::{Admin, ApiResult, Stored, json, page, stored};
use crate::model::{CampaignAction, CampaignStatus};

/// The campaigns' routes and their part of the document.
#[derive(OpenApi)]
#[openapi(paths(
    list_campaigns,
    create_campaign,
    get_campaign,
    delete_campaign,
    transition
))]
pub(super) struct Doc;

pub(super) fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route(
            "/api/v1/campaigns",
            get(list_campaigns).post(create_campaign),
        )
        .route(
            "/api/v1/campaigns/{id}",
            get(get_campaign).delete(delete_campaign),
        )
        .route("/api/v1/campaigns/{id}/{action}", post(transition))
}

/// A new campaign (it starts as DRAFT).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CampaignIn {
    #[schema(schema_with = super::schema::name)]
    name: String,
    /// An existing template (422 otherwise).
    template_id: Uuid,
    /// An existing segment (422 otherwise).
    segment_id: Uuid,
    /// Messages sent per second, at most; 1 unless given (the data model's default).
    #[serde(default = "default_rate", deserialize_with = "integer")]
    #[schema(minimum = 1, default = 1)]
    rate_limit_per_second: i32,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = super::schema::time_of_day)]
    quiet_hours_start: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = super::schema::time_of_day)]
    quiet_hours_end: Option<Option<String>>,
    /// A READY campaign is started by the scheduler at this time (before
    /// the year 10000 in UTC).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, format = DateTime)]
    schedule_time: Option<DateTime<Utc>>,
}

fn default_rate() -> i32 {
    1
}

/// Quiet hours when a campaign gives none, as in the data model.
const QUIET_START: NaiveTime = NaiveTime::from_hms_opt(22, 0, 0).expect("a time of day");
const QUIET_END: NaiveTime = NaiveTime::from_hms_opt(8, 0, 0).expect("a time of day");

/// `HH:MM` or `HH:MM:SS`, exactly (the document's pattern).
fn quiet_time(field: &str, v: Option<&str>) -> Result<Option<NaiveTime>, ApiError> {
    let Some(text) = v else {
        return Ok(None);
    };
    let numbers: Option<Vec<u32>> = text
        .split(':')
        .map(|part| {
            if part.len() == 2 && part.bytes().all(|b| b.is_ascii_digit()) {
                part.parse().ok()
            } else {
                None
            }
        })
        .collect();
    let time = match numbers.as_deref() {
        Some(&[h, m]) => NaiveTime::from_hms_opt(h, m, 0),
        Some(&[h, m, s]) => NaiveTime::from_hms_opt(h, m, s),
        _ => None,
    };
    time.map(Some)
        .ok_or_else(|| ApiError::invalid(field, format!("{text:?} is not a time of day (HH:MM)")))
}

/// Fan-out progress, once the campaign was started.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Fanout {
    messages_created: i64,
    skipped: i64,
    /// Recipients skipped, per reason.
    #[schema(value_type = Object)]
    skipped_reasons: Value,
    finished: bool,
    finished_at: Option<DateTime<Utc>>,
}

/// A stored campaign.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Campaign {
    id: Uuid,
    name: String,
    /// Null once the template was deleted (a draft or finished campaign).
    template_id: Option<Uuid>,
    /// Null once the segment was deleted (a draft or finished campaign).
    segment_id: Option<Uuid>,
    #[schema(schema_with = super::schema::campaign_status)]
    status: CampaignStatus,
    #[schema(schema_with = super::schema::paused_from)]
    paused_from: Option<CampaignStatus>,
    rate_limit_per_second: i32,
    /// HH:MM:SS
    quiet_hours_start: Option<NaiveTime>,
    /// HH:MM:SS
    quiet_hours_end: Option<NaiveTime>,
    schedule_time: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// Messages per status.
    counts: BTreeMap<String, i64>,
    /// Null until the campaign runs.
    fanout: Option<Fanout>,
}

const CAMPAIGN: &str = "
SELECT c.id, c.name, c.template_id, c.segment_id, c.status, c.paused_from,
       c.rate_limit_per_second, c.quiet_hours_start, c.quiet_hours_end, c.schedule_time,
       c.started_at, c.completed_at, c.created_at, c.updated_at,
       coalesce((SELECT jsonb_object_agg(s.status, s.n) FROM
                  (SELECT m.status, count(*) AS n FROM messages m
                    WHERE m.campaign_id = c.id GROUP BY m.status) s),
                '{}'::jsonb) AS counts,
       f.campaign_id IS NOT NULL AS has_fanout, f.messages_created, f.skipped,
       f.skipped_reasons, f.finished, f.finished_at
  FROM campaigns c LEFT JOIN fanout_progress f ON f.campaign_id = c.id";

impl Stored for Campaign {
    const NAME: &'static str = "campaign";
    const SELECT: &'static str = CAMPAIGN;
    const ID: &'static str = "c.id";

    fn id(&self) -> Uuid {
        self.id
    }

    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        let has_fanout: bool = row.try_get("has_fanout")?;
        let counts: Json<BTreeMap<String, i64>> = row.try_get("counts")?;
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            template_id: row.try_get("template_id")?,
            segment_id: row.try_get("segment_id")?,
            status: row.try_get("status")?,
            paused_from: row.try_get("paused_from")?,
            rate_limit_per_second: row.try_get("rate_limit_per_second")?,
            quiet_hours_start: row.try_get("quiet_hours_start")?,
            quiet_hours_end: row.try_get("quiet_hours_end")?,
            schedule_time: row.try_get("schedule_time")?,
            started_at: row.try_get("started_at")?,
            completed_at: row.try_get("completed_at")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            counts: counts.0,
            fanout: match has_fanout {
                false => None,
                true => Some(Fanout {
                    messages_created: row.try_get("messages_created")?,
                    skipped: row.try_get("skipped")?,
                    skipped_reasons: row.try_get("skipped_reasons")?,
                    finished: row.try_get("finished")?,
                    finished_at: row.try_get("finished_at")?,
                }),
            },
        })
    }
}

/// `?limit=&after=&status=`: keyset paging, optionally of one state.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct CampaignQuery {
    /// Items per page.
    #[serde(default = "super::extract::default_limit")]
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: i64,
    /// Keyset cursor: the last id of the previous page (`next_after`);
    /// the first page by default.
    #[serde(default)]
    #[param(value_type = Option<String>, format = Uuid)]
    after: Uuid,
    #[param(schema_with = super::schema::status_filter)]
    status: Option<CampaignStatus>,
}

/// One page of campaigns.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CampaignList {
    items: Vec<Campaign>,
    /// `after` for the next page; null on the last.
    next_after: Option<Uuid>,
}

/// List campaigns with message counts per status
#[utoipa::path(
    get,
    path = "/api/v1/campaigns",
    tag = "campaigns",
    params(CampaignQuery),
    responses((status = 200, description = "A page of campaigns, by id", body = CampaignList))
)]
pub(super) async fn list_campaigns(
    State(a): State<Arc<Admin>>,
    ApiQuery(p): ApiQuery<CampaignQuery>,
) -> ApiResult {
    let status = Some(("($3::text IS NULL OR c.status = $3)", &p.status as _));
    let (items, next_after) = page::<Campaign>(&a, p.after, p.limit, status).await?;
    json(StatusCode::OK, CampaignList { items, next_after })
}

/// Create a campaign (DRAFT)
///
/// A `template_id` or `segment_id` that names nothing is 422 (the document
/// cannot say which ids exist), and so is a WhatsApp template without an
/// approved `content_sid`.
#[utoipa::path(
    post,
    path = "/api/v1/campaigns",
    tag = "campaigns",
    request_body = CampaignIn,
    responses((status = 201, description = "Created", body = Campaign))
)]
pub(super) async fn create_campaign(
    State(a): State<Arc<Admin>>,
    ApiJson(c): ApiJson<CampaignIn>,
) -> ApiResult {
    check_name(&c.name)?;
    if c.rate_limit_per_second < 1 {
        return Err(ApiError::invalid(
            "/rate_limit_per_second",
            "rate_limit_per_second must be at least 1",
        ));
    }
    if c.schedule_time.is_some_and(|at| at.year() > 9999) {
        // RFC 3339 (and so the answer's `date-time`) has four-digit years.
        return Err(ApiError::invalid(
            "/schedule_time",
            "schedule_time must be before the year 10000 (UTC)",
        ));
    }
    // Both left out: the data model's quiet hours, 22:00 to 08:00; `null`
    // for both: none.
    let (start, end) = match (&c.quiet_hours_start, &c.quiet_hours_end) {
        (None, None) => (Some(QUIET_START), Some(QUIET_END)),
        (start, end) => (
            quiet_time("/quiet_hours_start", start.clone().flatten().as_deref())?,
            quiet_time("/quiet_hours_end", end.clone().flatten().as_deref())?,
        ),
    };
    if start.is_some() != end.is_some() {
        return Err(ApiError::invalid(
            "/quiet_hours_end",
            "quiet_hours_start and quiet_hours_end come together",
        ));
    }
    let client = a.pool.get().await?;
    for (table, field, id) in [
        ("templates", "/template_id", c.template_id),
        ("segments", "/segment_id", c.segment_id),
    ] {
        let sql = format!("SELECT 1 FROM {table} WHERE id = $1");
        if client.query_opt(&sql, &[&id]).await?.is_none() {
            let what = table.trim_end_matches('s');
            return Err(ApiError::invalid(
                field,
                format!("{what} {id} does not exist"),
            ));
        }
    }
    // WhatsApp delivers a business-initiated message only as content the
    // provider approved: a WhatsApp template without it could send nothing.
    let unapproved = client
        .query_opt(
            "SELECT 1 FROM templates WHERE id = $1 AND channel = 'WHATSAPP' AND content_sid IS NULL",
            &[&c.template_id],
        )
        .await?;
    if unapproved.is_some() {
        return Err(ApiError::invalid(
            "/template_id",
            format!(
                "template {} is a WhatsApp template without content_sid: WhatsApp sends a campaign only as approved content (set the template's content_sid)",
                c.template_id
            ),
        ));
    }
    let row = client
        .query_one(
            "INSERT INTO campaigns (name, template_id, segment_id, rate_limit_per_second,
                                    quiet_hours_start, quiet_hours_end, schedule_time, id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            &[
                &c.name,
                &c.template_id,
                &c.segment_id,
                &c.rate_limit_per_second,
                &start,
                &end,
                &c.schedule_time,
                &Uuid::now_v7(),
            ],
        )
        .await?;
    json(
        StatusCode::CREATED,
        stored::<Campaign>(&client, row.try_get(0)?).await?,
    )
}

/// Get a campaign with message counts and fan-out progress
#[utoipa::path(
    get,
    path = "/api/v1/campaigns/{id}",
    tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses((status = 200, description = "The campaign", body = Campaign))
)]
pub(super) async fn get_campaign(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let client = a.pool.get().await?;
    json(StatusCode::OK, stored::<Campaign>(&client, id).await?)
}

/// Delete a campaign with its messages (DRAFT, COMPLETED or CANCELLED; 409 otherwise)
#[utoipa::path(
    delete,
    path = "/api/v1/campaigns/{id}",
    tag = "campaigns",
    params(("id" = Uuid, Path, description = "Campaign id")),
    responses((status = 204, description = "Deleted, with its messages"))
)]
pub(super) async fn delete_campaign(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    let status: CampaignStatus = tx
        .query_opt(
            "SELECT status FROM campaigns WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("campaign", id))?
        .try_get(0)?;
    if CampaignStatus::ACTIVE.contains(&status) {
        return Err(ApiError::conflict(
            "in_use",
            format!(
                "campaign {id} is {status}: only a DRAFT, COMPLETED or CANCELLED campaign can be deleted (cancel it first)"
            ),
        ));
    }
    // Its messages and fan-out progress go with it (ON DELETE CASCADE).
    tx.execute("DELETE FROM campaigns WHERE id = $1", &[&id])
        .await?;
    tx.commit().await?;
    Ok(axum::response::IntoResponse::into_response(
        StatusCode::NO_CONTENT,
    ))
}

/// What an operator asks of a campaign: [`CampaignAction::OPERATOR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum Action {
    Ready,
    Start,
    Pause,
    Resume,
    Cancel,
}

impl Action {
    const ALL: [Action; 5] = [
        Action::Ready,
        Action::Start,
        Action::Pause,
        Action::Resume,
        Action::Cancel,
    ];

    fn campaign_action(self) -> CampaignAction {
        match self {
            Action::Ready => CampaignAction::Ready,
            Action::Start => CampaignAction::Start,
            Action::Pause => CampaignAction::Pause,
            Action::Resume => CampaignAction::Resume,
            Action::Cancel => CampaignAction::Cancel,
        }
    }

    fn parse(text: &str) -> Option<Action> {
        Self::ALL
            .into_iter()
            .find(|a| a.campaign_action().as_str() == text)
    }
}

/// Transition a campaign
///
/// ready (DRAFT→READY; without a `schedule_time`, on to RUNNING at once),
/// start (READY→RUNNING), pause (DRAFT|READY|RUNNING→PAUSED),
/// resume (PAUSED→where it was; READY without a `schedule_time` starts), cancel (any non-final→CANCELLED). An illegal
/// one is 409 naming the allowed actions; a legal one is published on
/// campaigns.commands before it is committed.
#[utoipa::path(
    post,
    path = "/api/v1/campaigns/{id}/{action}",
    tag = "campaigns",
    params(
        ("id" = Uuid, Path, description = "Campaign id"),
        ("action" = inline(Action), Path, description = "What to do")
    ),
    responses((status = 200, description = "The campaign after the transition", body = Campaign))
)]
pub(super) async fn transition(
    State(a): State<Arc<Admin>>,
    ApiPath((id, action)): ApiPath<(Uuid, String)>,
) -> ApiResult {
    let Some(action) = Action::parse(&action) else {
        let actions: Vec<&str> = Action::ALL
            .iter()
            .map(|a| a.campaign_action().as_str())
            .collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("unknown action {action:?}; actions: {}", actions.join(", ")),
        ));
    };
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    let to = a
        .commands
        .transition(&tx, id, action.campaign_action(), "api")
        .await?;
    // The data model's `schedule_time` NULL means immediate: a campaign
    // made READY without one starts now (its start command follows).
    if to == CampaignStatus::Ready {
        let immediate = tx
            .query_one(
                "SELECT schedule_time IS NULL FROM campaigns WHERE id = $1",
                &[&id],
            )
            .await?
            .try_get::<_, bool>(0)?;
        if immediate {
            a.commands
                .transition(&tx, id, CampaignAction::Start, "api")
                .await?;
        }
    }
    tx.commit().await?;
    json(StatusCode::OK, stored::<Campaign>(&client, id).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented actions are the operator's, by the names the handler reads.
    #[test]
    fn documented_actions_are_the_operator_actions() {
        let actions: Vec<CampaignAction> = Action::ALL.map(Action::campaign_action).to_vec();
        assert_eq!(actions, CampaignAction::OPERATOR);
        for a in Action::ALL {
            let name = serde_json::to_value(a).expect("serializes");
            assert_eq!(name, a.campaign_action().as_str());
        }
    }

    #[test]
    fn quiet_times_are_exactly_hh_mm_or_hh_mm_ss() {
        for ok in ["00:00", "23:59", "07:30:15"] {
            assert!(quiet_time("/f", Some(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "7:30", "24:00", "12:60", "12:00:60", "12:00:", "12", "", "ab:cd", "+1:00",
        ] {
            assert!(quiet_time("/f", Some(bad)).is_err(), "{bad}");
        }
    }
}
