//! `/api/v1/segments`: audiences as filters over user attributes, their
//! size and their first users.

use std::sync::Arc;
use uuid::Uuid;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::Row;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::contract::Part;
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, ListQuery, check_limit, check_name, check_text};
use super::{Admin, ApiResult, Stored, delete_unused, json, page, refuse_if_used, stored};
use crate::campaigns::segment;
use crate::model::CampaignStatus;

/// The segments' routes and their part of the document.
#[derive(OpenApi)]
#[openapi(paths(
    list_segments,
    create_segment,
    get_segment,
    update_segment,
    delete_segment,
    estimate_segment,
    preview_segment
))]
pub(super) struct Doc;

pub(super) fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route("/api/v1/segments", get(list_segments).post(create_segment))
        .route(
            "/api/v1/segments/{id}",
            get(get_segment).put(update_segment).delete(delete_segment),
        )
        .route("/api/v1/segments/{id}/estimate", get(estimate_segment))
        .route("/api/v1/segments/{id}/preview", get(preview_segment))
}

/// A segment as written by its author.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SegmentIn {
    #[schema(schema_with = super::schema::name)]
    name: String,
    #[serde(default)]
    #[schema(schema_with = super::schema::description)]
    description: Option<String>,
    #[schema(schema_with = super::schema::filter)]
    filter_criteria: Value,
}

/// A stored segment.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Segment {
    id: Uuid,
    name: String,
    description: Option<String>,
    #[schema(schema_with = super::schema::filter)]
    filter_criteria: Value,
    /// Opted-in users the filter selected at `estimated_at`: counted when the
    /// segment is created or changed, and refreshed every
    /// `campaigns.estimate-interval`.
    estimated_audience_size: i32,
    estimated_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

macro_rules! columns {
    () => {
        "id, name, description, filter_criteria, estimated_audience_size, estimated_at, created_at, updated_at"
    };
}

impl Stored for Segment {
    const NAME: &'static str = "segment";
    const SELECT: &'static str = concat!("SELECT ", columns!(), " FROM segments");

    fn id(&self) -> Uuid {
        self.id
    }

    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            description: row.try_get("description")?,
            filter_criteria: row.try_get("filter_criteria")?,
            estimated_audience_size: row.try_get("estimated_audience_size")?,
            estimated_at: row.try_get("estimated_at")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// One page of segments.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SegmentList {
    items: Vec<Segment>,
    /// `after` for the next page; null on the last.
    next_after: Option<Uuid>,
}

fn check_segment(s: &SegmentIn, a: &Admin) -> Result<(), ApiError> {
    check_name(&s.name)?;
    if let Some(d) = &s.description {
        check_text("/description", d)?;
    }
    segment::parse(&s.filter_criteria, a.max_depth)
        .map_err(|e| ApiError::invalid(format!("/filter_criteria{}", e.pointer), e.message))?;
    check_offsets(&s.filter_criteria, "/filter_criteria")?;
    a.contract
        .check(Part::Filter, "/filter_criteria", &s.filter_criteria)
}

/// PostgreSQL reads UTC offsets up to ±15:59: a before/after timestamp with
/// a larger one would be stored and then fail every estimate and fan-out.
fn check_offsets(node: &Value, pointer: &str) -> Result<(), ApiError> {
    const LIMIT_SECONDS: i32 = 16 * 3600;
    if let Some(Value::Array(conditions)) = node.get("conditions") {
        for (i, condition) in conditions.iter().enumerate() {
            check_offsets(condition, &format!("{pointer}/conditions/{i}"))?;
        }
        return Ok(());
    }
    let compares_moments = matches!(
        node.get("operator").and_then(Value::as_str),
        Some("before" | "after")
    );
    if compares_moments
        && let Some(text) = node.get("value").and_then(Value::as_str)
        && let Ok(at) = DateTime::parse_from_rfc3339(text)
        && at.offset().local_minus_utc().abs() >= LIMIT_SECONDS
    {
        return Err(ApiError::invalid(
            format!("{pointer}/value"),
            "the UTC offset must be within ±15:59",
        ));
    }
    Ok(())
}

/// List segments
#[utoipa::path(
    get,
    path = "/api/v1/segments",
    tag = "segments",
    params(ListQuery),
    responses((status = 200, description = "A page of segments, by id", body = SegmentList))
)]
pub(super) async fn list_segments(
    State(a): State<Arc<Admin>>,
    ApiQuery(p): ApiQuery<ListQuery>,
) -> ApiResult {
    let (items, next_after) = page::<Segment>(&a, p.after, p.limit, None).await?;
    json(StatusCode::OK, SegmentList { items, next_after })
}

/// Create a segment
#[utoipa::path(
    post,
    path = "/api/v1/segments",
    tag = "segments",
    request_body = SegmentIn,
    responses((status = 201, description = "Created", body = Segment))
)]
pub(super) async fn create_segment(
    State(a): State<Arc<Admin>>,
    ApiJson(s): ApiJson<SegmentIn>,
) -> ApiResult {
    check_segment(&s, &a)?;
    let client = a.pool.get().await?;
    let row = client
        .query_one(
            "INSERT INTO segments (id, name, description, filter_criteria) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&Uuid::now_v7(), &s.name, &s.description, &s.filter_criteria],
        )
        .await?;
    let id: Uuid = row.try_get(0)?;
    estimate(&client, id, a.max_depth).await?;
    json(StatusCode::CREATED, stored::<Segment>(&client, id).await?)
}

/// Get a segment
#[utoipa::path(
    get,
    path = "/api/v1/segments/{id}",
    tag = "segments",
    params(("id" = Uuid, Path, description = "Segment id")),
    responses((status = 200, description = "The segment", body = Segment))
)]
pub(super) async fn get_segment(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let client = a.pool.get().await?;
    json(StatusCode::OK, stored::<Segment>(&client, id).await?)
}

/// Replace a segment (409 while a READY, RUNNING or PAUSED campaign uses it)
#[utoipa::path(
    put,
    path = "/api/v1/segments/{id}",
    tag = "segments",
    params(("id" = Uuid, Path, description = "Segment id")),
    request_body = SegmentIn,
    responses((status = 200, description = "The segment as stored", body = Segment))
)]
pub(super) async fn update_segment(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(s): ApiJson<SegmentIn>,
) -> ApiResult {
    check_segment(&s, &a)?;
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    refuse_if_used(&tx, "segment_id", id, CampaignStatus::ACTIVE, "updated").await?;
    tx.query_opt(
        "UPDATE segments SET name = $2, description = $3, filter_criteria = $4, updated_at = now()
          WHERE id = $1 RETURNING id",
        &[&id, &s.name, &s.description, &s.filter_criteria],
    )
    .await?
    .ok_or_else(|| ApiError::not_found("segment", id))?;
    tx.commit().await?;
    estimate(&client, id, a.max_depth).await?;
    json(StatusCode::OK, stored::<Segment>(&client, id).await?)
}

/// Delete a segment (409 while a READY, RUNNING or PAUSED campaign uses it; other campaigns keep their rows with the segment cleared)
#[utoipa::path(
    delete,
    path = "/api/v1/segments/{id}",
    tag = "segments",
    params(("id" = Uuid, Path, description = "Segment id")),
    responses((status = 204, description = "Deleted"))
)]
pub(super) async fn delete_segment(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    delete_unused(&a, "segments", "segment_id", id).await
}

/// The compiled audience condition of segment `id` (`u` = users), with its params.
async fn audience(
    client: &deadpool_postgres::Client,
    id: Uuid,
    max_depth: usize,
    first: usize,
) -> Result<segment::Compiled, ApiError> {
    let node = audience_node(client, id, max_depth).await?;
    Ok(segment::compile(&node, "u", first))
}

/// Segment `id`'s stored filter.
async fn audience_node(
    client: &deadpool_postgres::Client,
    id: Uuid,
    max_depth: usize,
) -> Result<segment::Node, ApiError> {
    let row = client
        .query_opt("SELECT filter_criteria FROM segments WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("segment", id))?;
    segment::parse(&row.try_get(0)?, max_depth)
        .map_err(|e| ApiError::invalid(format!("/filter_criteria{}", e.pointer), e.message))
}

/// Counts segment `id`'s audience now and stores it as its
/// `estimated_audience_size`: on create, on change and on the API's request
/// (the scheduler refreshes it every `campaigns.estimate-interval`).
pub(super) async fn estimate(
    client: &deadpool_postgres::Client,
    id: Uuid,
    max_depth: usize,
) -> Result<(i64, DateTime<Utc>), ApiError> {
    let node = audience_node(client, id, max_depth).await?;
    Ok(segment::store_estimate(client, id, &node).await?)
}

/// A fresh audience count.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Estimate {
    segment_id: Uuid,
    /// Opted-in users the filter selects now.
    estimated_audience_size: i64,
    estimated_at: DateTime<Utc>,
}

/// Count the audience now and store it as estimated_audience_size
#[utoipa::path(
    get,
    path = "/api/v1/segments/{id}/estimate",
    tag = "segments",
    params(("id" = Uuid, Path, description = "Segment id")),
    responses((status = 200, description = "The audience size", body = Estimate))
)]
pub(super) async fn estimate_segment(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let client = a.pool.get().await?;
    let (size, at) = estimate(&client, id, a.max_depth).await?;
    json(
        StatusCode::OK,
        Estimate {
            segment_id: id,
            estimated_audience_size: size,
            estimated_at: at,
        },
    )
}

/// `?limit=`: how many users to show.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct PreviewQuery {
    /// Users to show.
    #[serde(default = "default_preview")]
    #[param(minimum = 1, maximum = 100, default = 10)]
    limit: i64,
}

fn default_preview() -> i64 {
    10
}

/// One user of an audience.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct AudienceUser {
    phone_e164: String,
    #[schema(value_type = Object)]
    attributes: Value,
}

/// The first users of an audience.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Preview {
    segment_id: Uuid,
    users: Vec<AudienceUser>,
}

/// The first users of the audience, by phone number
#[utoipa::path(
    get,
    path = "/api/v1/segments/{id}/preview",
    tag = "segments",
    params(("id" = Uuid, Path, description = "Segment id"), PreviewQuery),
    responses((status = 200, description = "Opted-in users the filter selects", body = Preview))
)]
pub(super) async fn preview_segment(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<PreviewQuery>,
) -> ApiResult {
    check_limit(q.limit, 100)?;
    let client = a.pool.get().await?;
    let filter = audience(&client, id, a.max_depth, 2).await?;
    let sql = format!(
        "SELECT u.phone_e164, u.attributes
           FROM users u WHERE u.consent_state = 'OPT_IN' AND {} ORDER BY u.phone_e164 LIMIT $1",
        filter.sql
    );
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&q.limit];
    params.extend(filter.refs());
    let rows = client.query(&sql, &params).await?;
    let users = rows
        .iter()
        .map(|r| {
            Ok(AudienceUser {
                phone_e164: r.try_get(0)?,
                attributes: r.try_get(1)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    json(
        StatusCode::OK,
        Preview {
            segment_id: id,
            users,
        },
    )
}
