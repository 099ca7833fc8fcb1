//! The admin API under `/api/v1` (JSON): templates, segments, campaigns and
//! their transitions. Every route but the OpenAPI document needs
//! `Authorization: Bearer $ESE_ADMIN_TOKEN`. Errors are
//! `{"error": {"code", "message", "field"?}}`; `field` is a JSON pointer into
//! the request body where one applies. The document is
//! `schemas/admin-api.openapi.json`, served at `/api/v1/openapi.json`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveTime, Utc};
use deadpool_postgres::Pool;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::{Commands, TransitionError, segment, template};
use crate::db::{self, ErrorClass};
use crate::model::{CampaignAction, CampaignStatus};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../../schemas/admin-api.openapi.json");

/// Every route: method and path (axum syntax). Tests check each against the
/// OpenAPI document and the bearer token.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/templates"),
    ("POST", "/api/v1/templates"),
    ("GET", "/api/v1/templates/{id}"),
    ("PUT", "/api/v1/templates/{id}"),
    ("DELETE", "/api/v1/templates/{id}"),
    ("POST", "/api/v1/templates/{id}/render"),
    ("GET", "/api/v1/segments"),
    ("POST", "/api/v1/segments"),
    ("GET", "/api/v1/segments/{id}"),
    ("PUT", "/api/v1/segments/{id}"),
    ("DELETE", "/api/v1/segments/{id}"),
    ("GET", "/api/v1/segments/{id}/estimate"),
    ("GET", "/api/v1/segments/{id}/preview"),
    ("GET", "/api/v1/campaigns"),
    ("POST", "/api/v1/campaigns"),
    ("GET", "/api/v1/campaigns/{id}"),
    ("POST", "/api/v1/campaigns/{id}/{action}"),
];

/// What the handlers share.
pub struct Admin {
    pool: Pool,
    commands: Commands,
    token: Option<String>,
    max_depth: usize,
}

/// `ESE_ADMIN_TOKEN`, if set and not empty.
pub fn token_from_env() -> Option<String> {
    std::env::var("ESE_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

impl Admin {
    pub fn new(
        pool: Pool,
        commands: Commands,
        token: Option<String>,
        max_depth: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool,
            commands,
            token,
            max_depth,
        })
    }

    /// The API's routes, to merge into the bridge's router.
    pub fn router(self: &Arc<Self>) -> Router {
        let admin = Router::new()
            .route(
                "/api/v1/templates",
                get(list_templates).post(create_template),
            )
            .route(
                "/api/v1/templates/{id}",
                get(get_template)
                    .put(update_template)
                    .delete(delete_template),
            )
            .route("/api/v1/templates/{id}/render", post(render_template))
            .route("/api/v1/segments", get(list_segments).post(create_segment))
            .route(
                "/api/v1/segments/{id}",
                get(get_segment).put(update_segment).delete(delete_segment),
            )
            .route("/api/v1/segments/{id}/estimate", get(estimate_segment))
            .route("/api/v1/segments/{id}/preview", get(preview_segment))
            .route(
                "/api/v1/campaigns",
                get(list_campaigns).post(create_campaign),
            )
            .route("/api/v1/campaigns/{id}", get(get_campaign))
            .route("/api/v1/campaigns/{id}/{action}", post(transition))
            .route_layer(axum::middleware::from_fn_with_state(self.clone(), auth))
            .with_state(self.clone());
        Router::new()
            .route(
                "/api/v1/openapi.json",
                get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
            )
            .merge(admin)
    }
}

async fn auth(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    let Some(expected) = &admin.token else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API is disabled: ESE_ADMIN_TOKEN is not set on the server",
        )
        .into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        next.run(req).await
    } else {
        metrics::counter!(crate::metrics::names::ADMIN_UNAUTHORIZED_TOTAL).increment(1);
        let msg = if given.is_empty() {
            "missing bearer token (Authorization: Bearer …)"
        } else {
            "wrong bearer token"
        };
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg).into_response()
    }
}

/// An error answer: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
        }
    }
    fn not_found(what: &str, id: i64) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} {id} does not exist"),
        )
    }
    fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(f) = self.field {
            error["field"] = Value::String(f);
        }
        (self.status, axum::Json(json!({ "error": error }))).into_response()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(d) = e.as_db_error() {
            match d.code().code() {
                "23505" => {
                    let msg = d.detail().unwrap_or(d.message()).to_string();
                    return Self::conflict("duplicate", msg);
                }
                "23503" => return Self::conflict("in_use", d.message().to_string()),
                _ => {}
            }
        }
        match db::classify(&e) {
            ErrorClass::Transient => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("database: {e}"),
            ),
            ErrorClass::Data => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("{e}"))
            }
            ErrorClass::Fatal => {
                tracing::error!(error = %e, "admin API database error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "database error",
                )
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("database: {e}"),
        )
    }
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::NotFound(id) => Self::not_found("campaign", id),
            TransitionError::Illegal { .. } => Self::conflict("illegal_transition", e.to_string()),
            TransitionError::Db(e) => e.into(),
            TransitionError::Kafka(m) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("nothing changed: {m}"),
            ),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

/// Parses a JSON body, naming what is wrong.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body: {e}"),
        )
    })
}

fn ok(status: StatusCode, v: Value) -> ApiResult {
    Ok((status, axum::Json(v)).into_response())
}

/// `?limit=&after=` keyset paging of lists.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default = "default_limit")]
    limit: i64,
    #[serde(default)]
    after: i64,
    status: Option<String>,
}

fn default_limit() -> i64 {
    50
}

fn page_of(items: Vec<Value>, limit: i64) -> Value {
    let next = (items.len() as i64 == limit)
        .then(|| items.last().and_then(|i| i.get("id")).cloned())
        .flatten();
    json!({ "items": items, "next_after": next })
}

fn check_limit(limit: i64, max: i64) -> Result<(), ApiError> {
    if (1..=max).contains(&limit) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit must be between 1 and {max}"),
        ))
    }
}

// ---------------------------------------------------------------- templates

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateIn {
    name: String,
    body: String,
    #[serde(default = "default_channel")]
    channel: String,
    #[serde(default)]
    defaults: BTreeMap<String, Value>,
}

fn default_channel() -> String {
    "SMS".to_string()
}

/// Validates a template; returns its variables.
fn check_template(t: &TemplateIn) -> Result<Vec<String>, ApiError> {
    if t.name.trim().is_empty() {
        return Err(ApiError::invalid("/name", "name must not be empty"));
    }
    if !["SMS", "WHATSAPP"].contains(&t.channel.as_str()) {
        return Err(ApiError::invalid(
            "/channel",
            "channel must be SMS or WHATSAPP",
        ));
    }
    if t.body.is_empty() {
        return Err(ApiError::invalid("/body", "body must not be empty"));
    }
    let parsed = template::parse(&t.body).map_err(|e| ApiError::invalid("/body", e.to_string()))?;
    for (k, v) in &t.defaults {
        if template::attribute_text(v).is_none() {
            return Err(ApiError::invalid(
                format!("/defaults/{}", pointer_escape(k)),
                "a default must be a string, number or boolean",
            ));
        }
    }
    Ok(parsed.variables())
}

fn pointer_escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

const TEMPLATE_JSON: &str = "SELECT row_to_json(t)::jsonb FROM templates t WHERE id = $1";

/// A template row as JSON, with the length of its body as written.
fn template_json(mut v: Value) -> Value {
    if let Some(body) = v.get("body").and_then(Value::as_str) {
        let len = template::length(body);
        v["length"] = serde_json::to_value(len).unwrap_or(Value::Null);
    }
    v
}

async fn create_template(State(a): State<Arc<Admin>>, bytes: Bytes) -> ApiResult {
    let t: TemplateIn = body(&bytes)?;
    let vars = check_template(&t)?;
    let defaults = serde_json::to_value(&t.defaults).unwrap_or_default();
    let client = a.pool.get().await?;
    let row = client
        .query_one(
            "INSERT INTO templates (name, channel, body, variables, defaults)
             VALUES ($1, $2, $3, $4, $5) RETURNING row_to_json(templates)::jsonb",
            &[&t.name, &t.channel, &t.body, &vars, &defaults],
        )
        .await?;
    ok(StatusCode::CREATED, template_json(row.get(0)))
}

async fn get_template(State(a): State<Arc<Admin>>, Path(id): Path<i64>) -> ApiResult {
    let client = a.pool.get().await?;
    let row = client
        .query_opt(TEMPLATE_JSON, &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("template", id))?;
    ok(StatusCode::OK, template_json(row.get(0)))
}

async fn list_templates(State(a): State<Arc<Admin>>, Query(p): Query<Page>) -> ApiResult {
    check_limit(p.limit, 500)?;
    let client = a.pool.get().await?;
    let rows = client
        .query(
            "SELECT row_to_json(t)::jsonb FROM templates t WHERE id > $1 ORDER BY id LIMIT $2",
            &[&p.after, &p.limit],
        )
        .await?;
    let items = rows.iter().map(|r| template_json(r.get(0))).collect();
    ok(StatusCode::OK, page_of(items, p.limit))
}

/// Campaigns that pin a template or segment: once past DRAFT and not final,
/// their fan-out renders from it.
const PINNED: &[CampaignStatus] = CampaignStatus::ACTIVE;

async fn update_template(
    State(a): State<Arc<Admin>>,
    Path(id): Path<i64>,
    bytes: Bytes,
) -> ApiResult {
    let t: TemplateIn = body(&bytes)?;
    let vars = check_template(&t)?;
    let defaults = serde_json::to_value(&t.defaults).unwrap_or_default();
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    refuse_if_used(&tx, "template_id", id, PINNED, "updated").await?;
    let row = tx
        .query_opt(
            "UPDATE templates SET name = $2, channel = $3, body = $4, variables = $5, defaults = $6,
                    updated_at = now()
              WHERE id = $1 RETURNING row_to_json(templates)::jsonb",
            &[&id, &t.name, &t.channel, &t.body, &vars, &defaults],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("template", id))?;
    tx.commit().await?;
    ok(StatusCode::OK, template_json(row.get(0)))
}

/// 409 while a campaign in one of `statuses` uses the template or segment.
async fn refuse_if_used(
    tx: &deadpool_postgres::Transaction<'_>,
    column: &str,
    id: i64,
    statuses: &[CampaignStatus],
    verb: &str,
) -> Result<(), ApiError> {
    let sql = format!(
        "SELECT id, status FROM campaigns WHERE {column} = $1 AND status = ANY($2) ORDER BY id LIMIT 5"
    );
    let rows = tx.query(&sql, &[&id, &statuses]).await?;
    if rows.is_empty() {
        return Ok(());
    }
    let users: Vec<String> = rows
        .iter()
        .map(|r| format!("{} ({})", r.get::<_, i64>(0), r.get::<_, CampaignStatus>(1)))
        .collect();
    Err(ApiError::conflict(
        "in_use",
        format!(
            "cannot be {verb} while campaigns use it: {}",
            users.join(", ")
        ),
    ))
}

async fn delete_template(State(a): State<Arc<Admin>>, Path(id): Path<i64>) -> ApiResult {
    delete(&a, "templates", "template_id", id).await
}

async fn delete(a: &Admin, table: &str, column: &str, id: i64) -> ApiResult {
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    refuse_if_used(
        &tx,
        column,
        id,
        &[
            CampaignStatus::Draft,
            CampaignStatus::Ready,
            CampaignStatus::Running,
            CampaignStatus::Paused,
        ],
        "deleted",
    )
    .await?;
    let n = tx
        .execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id])
        .await?;
    tx.commit().await?;
    if n == 0 {
        return Err(ApiError::not_found(table.trim_end_matches('s'), id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenderIn {
    #[serde(default)]
    variables: BTreeMap<String, Value>,
}

async fn render_template(
    State(a): State<Arc<Admin>>,
    Path(id): Path<i64>,
    bytes: Bytes,
) -> ApiResult {
    let input: RenderIn = if bytes.is_empty() {
        RenderIn {
            variables: BTreeMap::new(),
        }
    } else {
        body(&bytes)?
    };
    let client = a.pool.get().await?;
    let row = client
        .query_opt("SELECT body, defaults FROM templates WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("template", id))?;
    let text: String = row.get(0);
    let defaults: Value = row.get(1);
    let parsed = template::parse(&text).map_err(|e| ApiError::invalid("/body", e.to_string()))?;
    let rendered = parsed
        .render(|name| {
            input
                .variables
                .get(name)
                .and_then(template::attribute_text)
                .or_else(|| defaults.get(name).and_then(template::attribute_text))
        })
        .map_err(|var| {
            ApiError::invalid(
                format!("/variables/{}", pointer_escape(&var)),
                format!("no value for variable {var} and the template has no default"),
            )
        })?;
    let length = template::length(&rendered);
    ok(
        StatusCode::OK,
        json!({ "body": rendered, "length": length }),
    )
}

// ----------------------------------------------------------------- segments

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SegmentIn {
    name: String,
    #[serde(default)]
    description: Option<String>,
    filter: Value,
}

fn check_segment(s: &SegmentIn, max_depth: usize) -> Result<(), ApiError> {
    if s.name.trim().is_empty() {
        return Err(ApiError::invalid("/name", "name must not be empty"));
    }
    segment::parse(&s.filter, max_depth)
        .map_err(|e| ApiError::invalid(format!("/filter{}", e.pointer), e.message))?;
    Ok(())
}

async fn create_segment(State(a): State<Arc<Admin>>, bytes: Bytes) -> ApiResult {
    let s: SegmentIn = body(&bytes)?;
    check_segment(&s, a.max_depth)?;
    let client = a.pool.get().await?;
    let row = client
        .query_one(
            "INSERT INTO segments (name, description, filter) VALUES ($1, $2, $3)
             RETURNING row_to_json(segments)::jsonb",
            &[&s.name, &s.description, &s.filter],
        )
        .await?;
    ok(StatusCode::CREATED, row.get(0))
}

async fn get_segment(State(a): State<Arc<Admin>>, Path(id): Path<i64>) -> ApiResult {
    let client = a.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT row_to_json(s)::jsonb FROM segments s WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("segment", id))?;
    ok(StatusCode::OK, row.get(0))
}

async fn list_segments(State(a): State<Arc<Admin>>, Query(p): Query<Page>) -> ApiResult {
    check_limit(p.limit, 500)?;
    let client = a.pool.get().await?;
    let rows = client
        .query(
            "SELECT row_to_json(s)::jsonb FROM segments s WHERE id > $1 ORDER BY id LIMIT $2",
            &[&p.after, &p.limit],
        )
        .await?;
    ok(
        StatusCode::OK,
        page_of(rows.iter().map(|r| r.get(0)).collect(), p.limit),
    )
}

async fn update_segment(
    State(a): State<Arc<Admin>>,
    Path(id): Path<i64>,
    bytes: Bytes,
) -> ApiResult {
    let s: SegmentIn = body(&bytes)?;
    check_segment(&s, a.max_depth)?;
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    refuse_if_used(&tx, "segment_id", id, PINNED, "updated").await?;
    let row = tx
        .query_opt(
            "UPDATE segments SET name = $2, description = $3, filter = $4,
                    estimated_audience_size = NULL, estimated_at = NULL, updated_at = now()
              WHERE id = $1 RETURNING row_to_json(segments)::jsonb",
            &[&id, &s.name, &s.description, &s.filter],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("segment", id))?;
    tx.commit().await?;
    ok(StatusCode::OK, row.get(0))
}

async fn delete_segment(State(a): State<Arc<Admin>>, Path(id): Path<i64>) -> ApiResult {
    delete(&a, "segments", "segment_id", id).await
}

/// The compiled audience condition of segment `id` (`u` = users), with its params.
async fn audience(
    client: &deadpool_postgres::Client,
    id: i64,
    max_depth: usize,
    first: usize,
) -> Result<segment::Compiled, ApiError> {
    let row = client
        .query_opt("SELECT filter FROM segments WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("segment", id))?;
    let node = segment::parse(&row.get(0), max_depth)
        .map_err(|e| ApiError::invalid(format!("/filter{}", e.pointer), e.message))?;
    Ok(segment::compile(&node, "u.attributes", first))
}

async fn estimate_segment(State(a): State<Arc<Admin>>, Path(id): Path<i64>) -> ApiResult {
    let client = a.pool.get().await?;
    let filter = audience(&client, id, a.max_depth, 1).await?;
    let sql = format!(
        "SELECT count(*) FROM users u WHERE u.consent_state = 'OPT_IN' AND {}",
        filter.sql
    );
    let size: i64 = client.query_one(&sql, &filter.refs()).await?.get(0);
    let row = client
        .query_one(
            "UPDATE segments SET estimated_audience_size = $2, estimated_at = now()
              WHERE id = $1 RETURNING estimated_at",
            &[&id, &size],
        )
        .await?;
    let at: DateTime<Utc> = row.get(0);
    ok(
        StatusCode::OK,
        json!({"segment_id": id, "estimated_audience_size": size, "estimated_at": at}),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewQuery {
    #[serde(default = "default_preview")]
    limit: i64,
}

fn default_preview() -> i64 {
    10
}

async fn preview_segment(
    State(a): State<Arc<Admin>>,
    Path(id): Path<i64>,
    Query(q): Query<PreviewQuery>,
) -> ApiResult {
    check_limit(q.limit, 100)?;
    let client = a.pool.get().await?;
    let filter = audience(&client, id, a.max_depth, 2).await?;
    let sql = format!(
        "SELECT jsonb_build_object('id', u.id, 'phone_number', u.phone_number, 'attributes', u.attributes)
           FROM users u WHERE u.consent_state = 'OPT_IN' AND {} ORDER BY u.id LIMIT $1",
        filter.sql
    );
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&q.limit];
    params.extend(filter.refs());
    let rows = client.query(&sql, &params).await?;
    let users: Vec<Value> = rows.iter().map(|r| r.get(0)).collect();
    ok(StatusCode::OK, json!({"segment_id": id, "users": users}))
}

// ---------------------------------------------------------------- campaigns

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignIn {
    name: String,
    template_id: i64,
    segment_id: i64,
    #[serde(default = "default_rate")]
    rate_limit_per_second: i32,
    quiet_hours_start: Option<String>,
    quiet_hours_end: Option<String>,
    schedule_time: Option<DateTime<Utc>>,
}

fn default_rate() -> i32 {
    10
}

fn quiet_time(field: &str, v: &Option<String>) -> Result<Option<NaiveTime>, ApiError> {
    v.as_deref()
        .map(|s| {
            NaiveTime::parse_from_str(s, "%H:%M")
                .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M:%S"))
                .map_err(|_| {
                    ApiError::invalid(field, format!("{s:?} is not a time of day (HH:MM)"))
                })
        })
        .transpose()
}

const CAMPAIGN_JSON: &str = "
SELECT row_to_json(c)::jsonb || jsonb_build_object(
         'counts', coalesce((SELECT jsonb_object_agg(status, n) FROM
                     (SELECT status, count(*) AS n FROM messages m WHERE m.campaign_id = c.id GROUP BY status) s),
                   '{}'::jsonb),
         'fanout', (SELECT jsonb_build_object('messages_created', f.messages_created,
                             'skipped', f.skipped, 'skipped_reasons', f.skipped_reasons,
                             'finished', f.finished, 'finished_at', f.finished_at)
                      FROM fanout_progress f WHERE f.campaign_id = c.id))
  FROM campaigns c";

async fn campaign_json(client: &deadpool_postgres::Client, id: i64) -> Result<Value, ApiError> {
    let row = client
        .query_opt(&format!("{CAMPAIGN_JSON} WHERE c.id = $1"), &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("campaign", id))?;
    Ok(row.get(0))
}

async fn create_campaign(State(a): State<Arc<Admin>>, bytes: Bytes) -> ApiResult {
    let c: CampaignIn = body(&bytes)?;
    if c.name.trim().is_empty() {
        return Err(ApiError::invalid("/name", "name must not be empty"));
    }
    if c.rate_limit_per_second < 1 {
        return Err(ApiError::invalid(
            "/rate_limit_per_second",
            "rate_limit_per_second must be at least 1",
        ));
    }
    let start = quiet_time("/quiet_hours_start", &c.quiet_hours_start)?;
    let end = quiet_time("/quiet_hours_end", &c.quiet_hours_end)?;
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
            return Err(ApiError::invalid(
                field,
                format!("{} {id} does not exist", table.trim_end_matches('s')),
            ));
        }
    }
    let row = client
        .query_one(
            "INSERT INTO campaigns (name, template_id, segment_id, rate_limit_per_second,
                                    quiet_hours_start, quiet_hours_end, schedule_time)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[
                &c.name,
                &c.template_id,
                &c.segment_id,
                &c.rate_limit_per_second,
                &start,
                &end,
                &c.schedule_time,
            ],
        )
        .await?;
    ok(
        StatusCode::CREATED,
        campaign_json(&client, row.get(0)).await?,
    )
}

async fn get_campaign(State(a): State<Arc<Admin>>, Path(id): Path<i64>) -> ApiResult {
    let client = a.pool.get().await?;
    ok(StatusCode::OK, campaign_json(&client, id).await?)
}

async fn list_campaigns(State(a): State<Arc<Admin>>, Query(p): Query<Page>) -> ApiResult {
    check_limit(p.limit, 500)?;
    let client = a.pool.get().await?;
    let rows = client
        .query(
            &format!(
                "{CAMPAIGN_JSON} WHERE c.id > $1 AND ($3::text IS NULL OR c.status = $3)
                  ORDER BY c.id LIMIT $2"
            ),
            &[&p.after, &p.limit, &p.status],
        )
        .await?;
    ok(
        StatusCode::OK,
        page_of(rows.iter().map(|r| r.get(0)).collect(), p.limit),
    )
}

async fn transition(
    State(a): State<Arc<Admin>>,
    Path((id, action)): Path<(i64, String)>,
) -> ApiResult {
    let action = match action.parse::<CampaignAction>() {
        Ok(a) if CampaignAction::OPERATOR.contains(&a) => a,
        _ => {
            let actions: Vec<&str> = CampaignAction::OPERATOR
                .iter()
                .map(|a| a.as_str())
                .collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("unknown action {action:?}; actions: {}", actions.join(", ")),
            ));
        }
    };
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    a.commands.transition(&tx, id, action, "api").await?;
    tx.commit().await?;
    ok(StatusCode::OK, campaign_json(&client, id).await?)
}
