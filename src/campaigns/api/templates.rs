//! `/api/v1/templates`: message templates, checked on write, rendered on demand.

use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::Row;
use utoipa::{OpenApi, ToSchema};

use super::contract::Part;
use super::error::ApiError;
use super::extract::{
    ApiJson, ApiPath, ApiQuery, ListQuery, OptionalJson, check_name, check_text, pointer_escape,
};
use super::{Admin, ApiResult, Stored, delete_unused, json, page, refuse_if_used, stored};
use crate::campaigns::template;
use crate::model::CampaignStatus;

/// The templates' routes and their part of the document.
#[derive(OpenApi)]
#[openapi(paths(
    list_templates,
    create_template,
    get_template,
    update_template,
    delete_template,
    render_template
))]
pub(super) struct Doc;

pub(super) fn routes() -> Router<Arc<Admin>> {
    Router::new()
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
}

/// The channel a template is written for.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub(super) enum Channel {
    #[default]
    Sms,
    Whatsapp,
}

impl Channel {
    fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "SMS",
            Channel::Whatsapp => "WHATSAPP",
        }
    }
}

/// A template as written by its author.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TemplateIn {
    #[schema(schema_with = super::schema::name)]
    name: String,
    #[schema(schema_with = super::schema::template_content)]
    content: String,
    /// SMS unless given.
    #[serde(default)]
    channel: Channel,
    #[serde(default)]
    #[schema(schema_with = super::schema::defaults)]
    defaults: BTreeMap<String, Value>,
    #[serde(default)]
    #[schema(schema_with = super::schema::content_sid)]
    content_sid: Option<String>,
    #[serde(default)]
    #[schema(schema_with = super::schema::content_variables)]
    content_variables: Vec<String>,
}

/// The SMS alphabet a text needs.
#[derive(Debug, Serialize, ToSchema)]
pub(super) enum Encoding {
    #[serde(rename = "GSM-7")]
    Gsm7,
    #[serde(rename = "UCS-2")]
    Ucs2,
}

/// How long a text is as an SMS.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Length {
    /// Unicode characters.
    characters: usize,
    /// SMS parts a carrier bills; 0 for an empty text.
    segments: usize,
    encoding: Encoding,
}

impl From<template::Length> for Length {
    fn from(l: template::Length) -> Self {
        Self {
            characters: l.characters,
            segments: l.segments,
            encoding: match l.encoding {
                template::Encoding::Gsm7 => Encoding::Gsm7,
                template::Encoding::Ucs2 => Encoding::Ucs2,
            },
        }
    }
}

/// A stored template.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Template {
    id: Uuid,
    name: String,
    #[schema(value_type = Channel)]
    channel: String,
    content: String,
    /// Distinct placeholder names in order of first appearance, kept in
    /// step with the content.
    variables: Vec<String>,
    /// Unicode characters of the content as written.
    character_count: i32,
    /// Value per variable used when a user has no such attribute.
    #[schema(value_type = Object)]
    defaults: Value,
    /// The content's length as written (placeholders counted as typed).
    length: Length,
    /// The approved content a WhatsApp campaign sends (Twilio Content API).
    content_sid: Option<String>,
    /// The variables filling the approved content's `{{1}}`, `{{2}}`…
    content_variables: Vec<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

macro_rules! columns {
    () => {
        "id, name, channel, content, variables, character_count, defaults, content_sid, content_variables, created_at, updated_at"
    };
}

impl Stored for Template {
    const NAME: &'static str = "template";
    const SELECT: &'static str = concat!("SELECT ", columns!(), " FROM templates");

    fn id(&self) -> Uuid {
        self.id
    }

    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        let content: String = row.try_get("content")?;
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            channel: row.try_get("channel")?,
            variables: serde_json::from_value(row.try_get("variables")?).unwrap_or_default(),
            character_count: row.try_get("character_count")?,
            defaults: row.try_get("defaults")?,
            length: template::length(&content).into(),
            content,
            content_sid: row.try_get("content_sid")?,
            content_variables: serde_json::from_value(row.try_get("content_variables")?)
                .unwrap_or_default(),
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// One page of templates.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TemplateList {
    items: Vec<Template>,
    /// `after` for the next page; null on the last.
    next_after: Option<Uuid>,
}

/// A checked template's columns, as INSERT and UPDATE bind them.
struct Columns {
    t: TemplateIn,
    channel: &'static str,
    variables: Value,
    defaults: Value,
    content_variables: Value,
}

impl Columns {
    /// Validates `t` (422 naming what is wrong) and derives its variables.
    fn checked(t: TemplateIn, a: &Admin) -> Result<Self, ApiError> {
        let variables = serde_json::json!(check_template(&t, a)?);
        Ok(Self {
            channel: t.channel.as_str(),
            defaults: Value::Object(t.defaults.clone().into_iter().collect()),
            content_variables: serde_json::json!(t.content_variables),
            variables,
            t,
        })
    }

    /// name, channel, content, variables, defaults, content_sid, content_variables.
    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 7] {
        [
            &self.t.name,
            &self.channel,
            &self.t.content,
            &self.variables,
            &self.defaults,
            &self.t.content_sid,
            &self.content_variables,
        ]
    }
}

/// Validates a template; returns its variables.
fn check_template(t: &TemplateIn, a: &Admin) -> Result<Vec<String>, ApiError> {
    check_name(&t.name)?;
    if t.content.is_empty() {
        return Err(ApiError::invalid("/content", "content must not be empty"));
    }
    check_text("/content", &t.content)?;
    let chars = t.content.chars().count();
    if chars > template::MAX_BODY_CHARS {
        return Err(ApiError::invalid(
            "/content",
            format!(
                "content has {chars} characters; at most {}",
                template::MAX_BODY_CHARS
            ),
        ));
    }
    let parsed =
        template::parse(&t.content).map_err(|e| ApiError::invalid("/content", e.to_string()))?;
    for (k, v) in &t.defaults {
        let field = format!("/defaults/{}", pointer_escape(k));
        check_text(&field, k)?;
        match template::attribute_text(v) {
            Some(text) => check_text(&field, &text)?,
            None => {
                return Err(ApiError::invalid(
                    field,
                    "a default must be a string, number or boolean",
                ));
            }
        }
    }
    if let Some(sid) = &t.content_sid
        && !crate::config::is_content_sid(sid)
    {
        return Err(ApiError::invalid(
            "/content_sid",
            format!("{sid:?} is not a ContentSid (HX and 32 hex digits)"),
        ));
    }
    if t.content_variables.len() > super::schema::MAX_CONTENT_VARIABLES {
        return Err(ApiError::invalid(
            "/content_variables",
            format!(
                "{} content variables; at most {}",
                t.content_variables.len(),
                super::schema::MAX_CONTENT_VARIABLES
            ),
        ));
    }
    for (i, name) in t.content_variables.iter().enumerate() {
        if !template::is_variable_name(name) {
            return Err(ApiError::invalid(
                format!("/content_variables/{i}"),
                format!(
                    "{name:?} is not a variable name (a letter or _, then letters, digits or _)"
                ),
            ));
        }
    }
    let defaults = Value::Object(t.defaults.clone().into_iter().collect());
    a.contract.check(Part::Defaults, "/defaults", &defaults)?;
    let content_variables = t.content_variables.iter().cloned().map(Value::String);
    a.contract.check(
        Part::ContentVariables,
        "/content_variables",
        &Value::Array(content_variables.collect()),
    )?;
    Ok(parsed.variables())
}

/// List templates
#[utoipa::path(
    get,
    path = "/api/v1/templates",
    tag = "templates",
    params(ListQuery),
    responses((status = 200, description = "A page of templates, by id", body = TemplateList))
)]
pub(super) async fn list_templates(
    State(a): State<Arc<Admin>>,
    ApiQuery(p): ApiQuery<ListQuery>,
) -> ApiResult {
    let (items, next_after) = page::<Template>(&a, p.after, p.limit, None).await?;
    json(StatusCode::OK, TemplateList { items, next_after })
}

/// Create a template
#[utoipa::path(
    post,
    path = "/api/v1/templates",
    tag = "templates",
    request_body = TemplateIn,
    responses((status = 201, description = "Created", body = Template))
)]
pub(super) async fn create_template(
    State(a): State<Arc<Admin>>,
    ApiJson(t): ApiJson<TemplateIn>,
) -> ApiResult {
    let row = Columns::checked(t, &a)?;
    let client = a.pool.get().await?;
    let row = client
        .query_one(
            concat!(
                "INSERT INTO templates (name, channel, content, variables, defaults, content_sid, content_variables, id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING ",
                columns!()
            ),
            &[&row.params()[..], &[&Uuid::now_v7()]].concat(),
        )
        .await?;
    json(StatusCode::CREATED, Template::from_row(&row)?)
}

/// Get a template
#[utoipa::path(
    get,
    path = "/api/v1/templates/{id}",
    tag = "templates",
    params(("id" = Uuid, Path, description = "Template id")),
    responses((status = 200, description = "The template", body = Template))
)]
pub(super) async fn get_template(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let client = a.pool.get().await?;
    json(StatusCode::OK, stored::<Template>(&client, id).await?)
}

/// Replace a template (409 while a READY, RUNNING or PAUSED campaign uses it)
#[utoipa::path(
    put,
    path = "/api/v1/templates/{id}",
    tag = "templates",
    params(("id" = Uuid, Path, description = "Template id")),
    request_body = TemplateIn,
    responses((status = 200, description = "The template as stored", body = Template))
)]
pub(super) async fn update_template(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(t): ApiJson<TemplateIn>,
) -> ApiResult {
    let row = Columns::checked(t, &a)?;
    let mut client = a.pool.get().await?;
    let tx = client.transaction().await?;
    refuse_if_used(&tx, "template_id", id, CampaignStatus::ACTIVE, "updated").await?;
    let row = tx
        .query_opt(
            concat!(
                "UPDATE templates SET name = $1, channel = $2, content = $3, variables = $4,
                        defaults = $5, content_sid = $6, content_variables = $7, updated_at = now()
                  WHERE id = $8 RETURNING ",
                columns!()
            ),
            &[&row.params()[..], &[&id]].concat(),
        )
        .await?
        .ok_or_else(|| ApiError::not_found("template", id))?;
    tx.commit().await?;
    json(StatusCode::OK, Template::from_row(&row)?)
}

/// Delete a template (409 while a READY, RUNNING or PAUSED campaign uses it; other campaigns keep their rows with the template cleared)
#[utoipa::path(
    delete,
    path = "/api/v1/templates/{id}",
    tag = "templates",
    params(("id" = Uuid, Path, description = "Template id")),
    responses((status = 204, description = "Deleted"))
)]
pub(super) async fn delete_template(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    delete_unused(&a, "templates", "template_id", id).await
}

/// What to render a template with.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RenderIn {
    #[serde(default)]
    #[schema(schema_with = super::schema::variables)]
    variables: BTreeMap<String, Value>,
}

/// A rendered message: its text (kept in the message's row) and, for a
/// template with approved content, what goes to the provider instead.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Rendered {
    rendered_content: String,
    length: Length,
    send: Option<ContentSend>,
}

/// An approved content and its numbered variables, as sent.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ContentSend {
    content_sid: String,
    /// `{"1": "Ada", …}`: the provider's `ContentVariables`.
    #[schema(value_type = Object)]
    content_variables: Value,
}

/// Render with variables; characters and SMS segments
///
/// The body may be left out (no variables). A variable with neither a value
/// here nor a default is 422, pointing at `/variables/<name>`.
#[utoipa::path(
    post,
    path = "/api/v1/templates/{id}/render",
    tag = "templates",
    params(("id" = Uuid, Path, description = "Template id")),
    request_body = Option<RenderIn>,
    responses((status = 200, description = "The rendered text", body = Rendered))
)]
pub(super) async fn render_template(
    State(a): State<Arc<Admin>>,
    ApiPath(id): ApiPath<Uuid>,
    OptionalJson(input): OptionalJson<RenderIn>,
) -> ApiResult {
    let input = input.unwrap_or_default();
    for (k, v) in &input.variables {
        if template::attribute_text(v).is_none() {
            return Err(ApiError::invalid(
                format!("/variables/{}", pointer_escape(k)),
                "a variable must be a string, number or boolean",
            ));
        }
    }
    let variables = Value::Object(input.variables.clone().into_iter().collect());
    a.contract
        .check(Part::RenderVariables, "/variables", &variables)?;
    let client = a.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT content, defaults, content_sid, content_variables FROM templates WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("template", id))?;
    let text: String = row.try_get(0)?;
    let defaults: Value = row.try_get(1)?;
    let content_sid: Option<String> = row.try_get(2)?;
    let content_variables: Vec<String> =
        serde_json::from_value(row.try_get(3)?).unwrap_or_default();
    let parsed =
        template::parse(&text).map_err(|e| ApiError::invalid("/content", e.to_string()))?;
    let value = |name: &str| {
        input
            .variables
            .get(name)
            .and_then(template::attribute_text)
            .or_else(|| defaults.get(name).and_then(template::attribute_text))
    };
    let missing = |var: String| {
        ApiError::invalid(
            format!("/variables/{}", pointer_escape(&var)),
            format!("no value for variable {var} and the template has no default"),
        )
    };
    let rendered = parsed.render(value).map_err(missing)?;
    let send = match content_sid {
        None => None,
        Some(content_sid) => {
            let mut vars = serde_json::Map::new();
            for (i, name) in content_variables.iter().enumerate() {
                let v = value(name).ok_or_else(|| missing(name.clone()))?;
                vars.insert((i + 1).to_string(), Value::String(v));
            }
            Some(ContentSend {
                content_sid,
                content_variables: Value::Object(vars),
            })
        }
    };
    let length = template::length(&rendered).into();
    json(
        StatusCode::OK,
        Rendered {
            rendered_content: rendered,
            length,
            send,
        },
    )
}
