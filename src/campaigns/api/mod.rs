//! The admin API under `/api/v1` (JSON), one module per resource:
//! [`templates`], [`segments`], [`campaigns`] (with their transitions) and
//! [`reports`].
//! Every route but the OpenAPI document needs
//! `Authorization: Bearer $ESE_ADMIN_TOKEN`. Errors are
//! `{"error": {"code", "message", "field"?}}` ([`ApiError`]); `field` is a
//! JSON pointer into the request body where one applies, and a path, query
//! or body that does not parse gets the same JSON error.
//!
//! The OpenAPI document is generated from the handlers' own types (utoipa),
//! with the rules the handlers enforce stated in it ([`schema`]); it is
//! served at `/api/v1/openapi.json` and checked in as
//! `schemas/admin-api.openapi.json` by a test (`ESE_WRITE_OPENAPI=1`
//! rewrites it).
//!
//! Beside the resources: [`error`] (the error answer), [`extract`] (request
//! extractors, paging, shared checks), [`schema`] (what derive cannot say).

mod campaigns;
mod contract;
mod error;
mod extract;
mod reports;
mod schema;
mod segments;
mod templates;

use std::sync::Arc;
use uuid::Uuid;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use deadpool_postgres::Pool;
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::OpenApi;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Ref, Schema};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Components, RefOr};

pub use error::ApiError;

use super::Commands;
use crate::model::CampaignStatus;

/// Where the OpenAPI document is served (no token needed).
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// `campaigns.max-filter-depth` in `config/default.toml`: the nesting limit
/// [`openapi_json`] documents. A test checks that the served document (made
/// with the configured limit) equals the checked-in one.
pub const DEFAULT_MAX_FILTER_DEPTH: usize = 8;

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
    ("DELETE", "/api/v1/campaigns/{id}"),
    ("POST", "/api/v1/campaigns/{id}/{action}"),
    ("GET", "/api/v1/reports/campaigns"),
    ("GET", "/api/v1/reports/dashboard"),
];

/// What the handlers share.
pub struct Admin {
    pool: Pool,
    commands: Commands,
    token: Option<String>,
    max_depth: usize,
    /// The document's schemas, enforced.
    contract: contract::Contract,
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
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            pool,
            commands,
            token,
            max_depth,
            contract: contract::Contract::new(&openapi(max_depth))?,
        }))
    }

    /// The API's routes, to merge into the bridge's router.
    pub fn router(self: &Arc<Self>) -> Router {
        let document = Bytes::from(to_json(&openapi(self.max_depth)));
        let admin = Router::new()
            .merge(templates::routes())
            .merge(segments::routes())
            .merge(campaigns::routes())
            .merge(reports::routes())
            .route_layer(axum::middleware::from_fn_with_state(self.clone(), auth))
            .with_state(self.clone());
        Router::new()
            .route(
                OPENAPI_PATH,
                get(move || {
                    let body = document.clone();
                    async move { ([(header::CONTENT_TYPE, "application/json")], body) }
                }),
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
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer x` too.
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
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

type ApiResult = Result<Response, ApiError>;

/// A resource the API reads from the database by id: a template, segment
/// or campaign.
trait Stored: Serialize + Sized {
    /// What a 404 calls it.
    const NAME: &'static str;
    /// `SELECT … FROM …` of its rows, up to the `WHERE`.
    const SELECT: &'static str;
    /// Its id column in [`Stored::SELECT`].
    const ID: &'static str = "id";
    /// A row of [`Stored::SELECT`]; a column of an unexpected type is an
    /// error (500), never a panic.
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error>;
    fn id(&self) -> Uuid;
}

/// `T` `id`, or 404.
async fn stored<T: Stored>(client: &deadpool_postgres::Client, id: Uuid) -> Result<T, ApiError> {
    let sql = format!("{} WHERE {} = $1", T::SELECT, T::ID);
    let row = client
        .query_opt(&sql, &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found(T::NAME, id))?;
    Ok(T::from_row(&row)?)
}

/// One page of `T` by id after `after`, at most `limit`, where `filter`
/// (SQL over `$3`, `extra`) holds; and `next_after`.
async fn page<T: Stored>(
    a: &Admin,
    after: Uuid,
    limit: i64,
    filter: Option<(&str, &(dyn tokio_postgres::types::ToSql + Sync))>,
) -> Result<(Vec<T>, Option<Uuid>), ApiError> {
    extract::check_limit(limit, extract::MAX_PAGE)?;
    let client = a.pool.get().await?;
    let (id, mut params) = (T::ID, vec![&after as _, &limit as _]);
    let and = match filter {
        Some((sql, extra)) => {
            params.push(extra);
            format!(" AND {sql}")
        }
        None => String::new(),
    };
    let sql = format!("{} WHERE {id} > $1{and} ORDER BY {id} LIMIT $2", T::SELECT);
    let items: Vec<T> = client
        .query(&sql, &params)
        .await?
        .iter()
        .map(T::from_row)
        .collect::<Result<_, _>>()?;
    let next = extract::next_after(items.len(), items.last().map(T::id), limit);
    Ok((items, next))
}

/// `value` as a JSON answer with `status`.
fn json<T: Serialize>(status: StatusCode, value: T) -> ApiResult {
    Ok((status, Json(value)).into_response())
}

/// 409 while a campaign in one of `statuses` uses the template or segment.
async fn refuse_if_used(
    tx: &deadpool_postgres::Transaction<'_>,
    column: &str,
    id: Uuid,
    statuses: &[CampaignStatus],
    verb: &str,
) -> Result<(), ApiError> {
    // Every campaign using it is locked, so none becomes active meanwhile.
    let sql =
        format!("SELECT id, status FROM campaigns WHERE {column} = $1 ORDER BY id FOR UPDATE");
    let mut campaigns = Vec::new();
    for r in tx.query(&sql, &[&id]).await? {
        campaigns.push((r.try_get::<_, Uuid>(0)?, r.try_get::<_, CampaignStatus>(1)?));
    }
    let users: Vec<String> = campaigns
        .into_iter()
        .filter(|(_, s)| statuses.contains(s))
        .take(5)
        .map(|(id, s)| format!("{id} ({s})"))
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    Err(ApiError::conflict(
        "in_use",
        format!(
            "cannot be {verb} while campaigns use it: {}",
            users.join(", ")
        ),
    ))
}

/// Deletes template or segment `id` (`table`, referenced as `column`):
/// 204, 404, or 409 while an active campaign (READY, RUNNING, PAUSED) uses
/// it; draft and finished campaigns keep their rows, the reference cleared.
async fn delete_unused(a: &Admin, table: &str, column: &str, id: Uuid) -> ApiResult {
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    refuse_if_used(&tx, column, id, CampaignStatus::ACTIVE, "deleted").await?;
    let n = tx
        .execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id])
        .await?;
    tx.commit().await?;
    if n == 0 {
        return Err(ApiError::not_found(table.trim_end_matches('s'), id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The document's frame; the resources add their paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Event Stream Engine admin API",
        version = "1",
        description = "Templates, segments and campaigns. Every route except this document \
            needs `Authorization: Bearer $ESE_ADMIN_TOKEN`; a missing or wrong token is 401. \
            Errors are `{\"error\": {\"code\", \"message\", \"field\"?}}` where `field` is a \
            JSON pointer into the request body."
    ),
    security(("bearer" = [])),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    tags(
        (name = "templates", description = "Message templates with `{variable}` placeholders"),
        (name = "segments", description = "Audiences: filters over user attributes"),
        (name = "campaigns", description = "A template sent to a segment, and its state machine"),
        (name = "meta", description = "This document")
    )
)]
struct ApiDoc;

/// Statuses any route may answer with the JSON error.
const ERROR_STATUSES: [&str; 6] = ["400", "401", "404", "409", "422", "503"];

/// The OpenAPI document, for segment filters nested at most
/// `max_filter_depth` levels.
pub fn openapi(max_filter_depth: usize) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.paths
        .add_path_operation(OPENAPI_PATH, vec![HttpMethod::Get], document_operation());
    doc.merge(templates::Doc::openapi());
    doc.merge(segments::Doc::openapi());
    doc.merge(campaigns::Doc::openapi());
    doc.merge(reports::Doc::openapi());
    let components = doc.components.get_or_insert_with(Components::new);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    components.responses.insert(
        "Error".to_string(),
        ResponseBuilder::new()
            .description("The JSON error")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .into(),
    );
    components.schemas.extend(schema::filters(max_filter_depth));
    if let Some(RefOr::T(Schema::Object(campaign_in))) = components.schemas.get_mut("CampaignIn") {
        // Not expressible with derive: the quiet hours come as a pair.
        campaign_in
            .extensions
            .get_or_insert_with(Default::default)
            .insert(
                "dependentRequired".to_string(),
                serde_json::json!({
                    "quiet_hours_start": ["quiet_hours_end"],
                    "quiet_hours_end": ["quiet_hours_start"],
                }),
            );
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        if path == OPENAPI_PATH {
            continue;
        }
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            for status in ERROR_STATUSES {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| Ref::from_response_name("Error").into());
            }
        }
    }
    doc
}

/// `GET /api/v1/openapi.json`, open to anyone (`security: []`).
fn document_operation() -> Operation {
    let mut operation: Operation = OperationBuilder::new()
        .operation_id(Some("openapi_document"))
        .summary(Some("This document (no token needed)"))
        .tag("meta")
        .response(
            "200",
            ResponseBuilder::new()
                .description("The OpenAPI document")
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(ObjectBuilder::new()))
                        .build(),
                ),
        )
        .into();
    operation.security = Some(Vec::new());
    operation
}

fn to_json(doc: &utoipa::openapi::OpenApi) -> String {
    let mut text = doc
        .to_pretty_json()
        .expect("the OpenAPI document is plain data and serializes");
    text.push('\n');
    text
}

/// The document as `schemas/admin-api.openapi.json` holds it: pretty JSON
/// for the default filter depth ([`DEFAULT_MAX_FILTER_DEPTH`]).
pub fn openapi_json() -> String {
    to_json(&openapi(DEFAULT_MAX_FILTER_DEPTH))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`ROUTES`] and the document's operations are the same set.
    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let doc: serde_json::Value =
            serde_json::from_str(&openapi_json()).expect("the document is JSON");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .chain([("GET".to_string(), OPENAPI_PATH.to_string())])
            .collect();
        documented.sort();
        routes.sort();
        assert_eq!(documented, routes);
        for (method, path) in ROUTES {
            let op = &doc["paths"][path][method.to_lowercase()];
            for status in ERROR_STATUSES {
                assert_eq!(
                    op["responses"][status]["$ref"], "#/components/responses/Error",
                    "{method} {path} documents {status}"
                );
            }
        }
        assert_eq!(
            doc["paths"][OPENAPI_PATH]["get"]["security"],
            serde_json::json!([])
        );
        assert!(doc["components"]["schemas"]["Filter7"].is_object());
        assert!(
            doc["components"]["schemas"]["CampaignIn"]["dependentRequired"].is_object(),
            "the quiet hours pair is stated"
        );
        assert!(doc["components"]["schemas"]["Filter8"].is_null());
    }
}
